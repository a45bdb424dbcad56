/* The machine's counters around one run, read without the GIL (evidence.h). */
#define _GNU_SOURCE
#include "evidence.h"

#define PY_SSIZE_T_CLEAN
#include <Python.h>  /* PyMem_Raw*: allowed without the GIL, seen by tracemalloc */

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define SMALL_FILE 512          /* a PSI file: two lines of ~100 bytes */
#define LINE_BUF 4096            /* /proc/stat and /proc/vmstat, read line by line */
/* A /dev/kmsg read must hold a whole record (up to 8 KiB), else EINVAL, and the kernel has
 * moved past it: the buffer is allocated only when poll says a record waits. */
#define KMSG_RECORD_MAX (16 * 1024)

static const char *const psi_paths[EV_PSI_RESOURCES] = {
    "/proc/pressure/cpu", "/proc/pressure/memory", "/proc/pressure/io",
};

/* Read at most cap - 1 bytes of path into buf, NUL-terminated. Return the length, or -1. */
static ssize_t read_file(const char *path, char *buf, size_t cap)
{
    size_t got = 0;
    int fd;
    do
        fd = open(path, O_RDONLY | O_CLOEXEC);
    while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return -1;
    while (got + 1 < cap) {
        ssize_t n = read(fd, buf + got, cap - 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            if (n < 0)
                got = (size_t)-1;
            break;
        }
        got += (size_t)n;
    }
    close(fd);
    if (got == (size_t)-1)
        return -1;
    buf[got] = '\0';
    return (ssize_t)got;
}

/* The decimal integer at s; *end after it. -1 when s has no digit. */
static int64_t parse_int(const char *s, const char **end)
{
    int64_t v = 0;
    const char *p = s;
    while (*p >= '0' && *p <= '9' && v < INT64_MAX / 10) {
        v = v * 10 + (*p - '0');
        p++;
    }
    if (end)
        *end = p;
    return p == s ? -1 : v;
}

/* "12.34" as 1234 (hundredths); -1 if malformed. */
static int64_t parse_centi(const char *s)
{
    const char *p;
    int64_t whole = parse_int(s, &p), frac = 0;
    if (whole < 0)
        return -1;
    if (*p == '.' && p[1] >= '0' && p[1] <= '9') {
        frac = (p[1] - '0') * 10;
        if (p[2] >= '0' && p[2] <= '9')
            frac += p[2] - '0';
    }
    return whole * 100 + frac;
}

/* In a "KIND avg10=.. avg60=.. avg300=.. total=.." line starting at line, the value of key
 * (as "key="), before the line's end. NULL if absent. */
static const char *psi_field(const char *line, const char *key)
{
    size_t klen = strlen(key);
    const char *eol = strchr(line, '\n');
    for (const char *p = line; (p = strstr(p, key)) != NULL && (!eol || p < eol); p += klen)
        if (p == line || p[-1] == ' ')
            return p + klen;
    return NULL;
}

/* One PSI file: the some/full lines' avg10 and total. */
static void read_psi(struct ev_machine *m, int i)
{
    char buf[SMALL_FILE];
    const char *line;
    m->psi_some_total[i] = m->psi_full_total[i] = -1;
    m->psi_some_avg10[i] = m->psi_full_avg10[i] = -1;
    if (read_file(psi_paths[i], buf, sizeof(buf)) <= 0)
        return;
    for (line = buf; *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : "") {
        int64_t *total, *avg;
        const char *v;
        if (strncmp(line, "some ", 5) == 0) {
            total = &m->psi_some_total[i];
            avg = &m->psi_some_avg10[i];
        } else if (strncmp(line, "full ", 5) == 0) {
            total = &m->psi_full_total[i];
            avg = &m->psi_full_avg10[i];
        } else {
            continue;
        }
        if ((v = psi_field(line, "avg10=")) != NULL)
            *avg = parse_centi(v);
        if ((v = psi_field(line, "total=")) != NULL)
            *total = parse_int(v, NULL);
    }
}

/* Call fn(line, ctx) for each line of path (NUL-terminated, without its '\n') until fn
 * returns nonzero, reading through a small buffer on the stack: /proc/stat and /proc/vmstat
 * are several KiB and read twice a run, and a heap buffer each time is churn (and, under
 * ASan, quarantined megabytes). A line longer than the buffer ends the reading. Return -1 if
 * the file could not be opened, else 0. */
static int for_each_line(const char *path, int (*fn)(const char *line, void *ctx), void *ctx)
{
    char buf[LINE_BUF];
    size_t have = 0;
    int fd, stop = 0;
    do
        fd = open(path, O_RDONLY | O_CLOEXEC);
    while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return -1;
    while (!stop) {
        char *line = buf, *eol;
        ssize_t n = read(fd, buf + have, sizeof(buf) - 1 - have);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        have += (size_t)n;
        buf[have] = '\0';
        while (!stop && (eol = strchr(line, '\n')) != NULL) {
            *eol = '\0';
            stop = fn(line, ctx);
            line = eol + 1;
        }
        have -= (size_t)(line - buf);
        memmove(buf, line, have);
        if (have == sizeof(buf) - 1)
            break;  /* no line end in a full buffer */
    }
    close(fd);
    return 0;
}

struct busy_ctx {
    const cpu_set_t *cpus;
    int64_t busy;  /* -1 until a CPU of the set was seen */
};

/* One "cpuN user nice system idle iowait irq softirq steal ..." line of /proc/stat; stop at
 * the first line that is not a CPU's (they come first, together). */
static int busy_line(const char *line, void *ctx)
{
    struct busy_ctx *c = ctx;
    const char *p;
    int64_t cpu, f[8], sum = 0;
    int n;
    if (strncmp(line, "cpu", 3) != 0)
        return 1;
    cpu = parse_int(line + 3, &p);  /* -1 for the "cpu" total line */
    if (cpu < 0 || cpu >= CPU_SETSIZE || !CPU_ISSET((int)cpu, c->cpus))
        return 0;
    for (n = 0; n < 8; n++) {
        while (*p == ' ')
            p++;
        if ((f[n] = parse_int(p, &p)) < 0)
            return 0;
        sum += f[n];
    }
    c->busy = (c->busy < 0 ? 0 : c->busy) + sum - f[3] - f[4];
    return 0;
}

/* Busy ticks (all but idle and iowait) of the CPUs in cpus, from /proc/stat; -1 if unread. */
static int64_t busy_ticks(const cpu_set_t *cpus)
{
    struct busy_ctx c = {cpus, -1};
    for_each_line("/proc/stat", busy_line, &c);
    return c.busy;
}

/* The value of a "name value" line, if line is that line. */
static int key_line(const char *line, const char *name, int64_t *value)
{
    size_t len = strlen(name);
    if (strncmp(line, name, len) != 0 || line[len] != ' ')
        return 0;
    *value = parse_int(line + len + 1, NULL);
    return 1;
}

static int vmstat_line(const char *line, void *ctx)
{
    struct ev_machine *m = ctx;
    key_line(line, "oom_kill", &m->oom_kill);
    key_line(line, "oom_group_kill", &m->oom_group_kill);
    return 0;
}

static void read_vmstat(struct ev_machine *m)
{
    m->oom_kill = m->oom_group_kill = -1;
    for_each_line("/proc/vmstat", vmstat_line, m);
}

void ev_machine_read(struct ev_machine *m, int with_vmstat)
{
    struct timespec ts;
    struct rusage ru;
    cpu_set_t cpus;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    m->at_ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    for (int i = 0; i < EV_PSI_RESOURCES; i++)
        read_psi(m, i);
    CPU_ZERO(&cpus);
    m->busy_ticks = sched_getaffinity(0, sizeof(cpus), &cpus) == 0 ? busy_ticks(&cpus) : -1;
    m->self_cpu_us = getrusage(RUSAGE_SELF, &ru) == 0
        ? (int64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000 + ru.ru_utime.tv_usec +
              ru.ru_stime.tv_usec
        : -1;
    if (with_vmstat)
        read_vmstat(m);
    else
        m->oom_kill = m->oom_group_kill = -1;
}

void ev_kmsg_open(struct ev_kmsg *k)
{
    memset(k, 0, sizeof(*k));
    do
        k->fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    while (k->fd < 0 && errno == EINTR);
    if (k->fd < 0) {  /* not root with kernel.dmesg_restrict=1; a container without it */
        k->open_errno = errno;
        return;
    }
    if (lseek(k->fd, 0, SEEK_END) < 0) {
        k->open_errno = errno;
        close(k->fd);
        k->fd = -1;
    }
}

/* Keep the first line of an OOM-looking record (Python parses it: retest.oom). */
static void keep_record(struct ev_kmsg *k, const char *rec, size_t len)
{
    const char *eol = memchr(rec, '\n', len);
    size_t line = eol ? (size_t)(eol - rec) : len;
    char *copy;
    if (line > EV_KMSG_LINE_MAX)
        line = EV_KMSG_LINE_MAX;
    if (!memmem(rec, line, "Killed process ", 15) && !memmem(rec, line, "oom-kill:", 9))
        return;
    if (k->n_kept == EV_KMSG_KEEP_MAX || !(copy = PyMem_RawMalloc(line + 1))) {
        k->complete = 0;
        return;
    }
    memcpy(copy, rec, line);
    copy[line] = '\0';
    k->kept[k->n_kept++] = copy;
}

/* Whether a record waits at the cursor (or records were lost: EPIPE to report). */
static int kmsg_pending(int fd)
{
    struct pollfd p = {fd, POLLIN, 0};
    int n;
    do
        n = poll(&p, 1, 0);
    while (n < 0 && errno == EINTR);
    return n != 0;  /* an error: let read() say what it is */
}

void ev_kmsg_collect(struct ev_kmsg *k)
{
    char *buf;
    int i;
    if (k->fd < 0) {
        k->complete = 0;
        return;
    }
    if (!k->collected)
        k->complete = 1;  /* a second collect goes on from where the first stopped */
    k->collected = 1;
    if (!kmsg_pending(k->fd))
        return;  /* most runs: nothing was logged, nothing to allocate */
    if (!(buf = PyMem_RawMalloc(KMSG_RECORD_MAX))) {
        k->complete = 0;
        return;
    }
    for (i = 0; i < EV_KMSG_READ_MAX; i++) {
        ssize_t n = read(k->fd, buf, KMSG_RECORD_MAX);  /* one record per read */
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EPIPE) {  /* the ring overwrote records we had not read */
            k->complete = 0;
            continue;
        }
        if (n <= 0) {
            if (n < 0 && errno != EAGAIN)
                k->complete = 0;
            break;
        }
        keep_record(k, buf, (size_t)n);
    }
    if (i == EV_KMSG_READ_MAX)
        k->complete = 0;  /* a flood of records: gave up */
    PyMem_RawFree(buf);
}

void ev_kmsg_free(struct ev_kmsg *k)
{
    for (int i = 0; i < k->n_kept; i++)
        PyMem_RawFree(k->kept[i]);
    k->n_kept = 0;
    if (k->fd >= 0) {
        close(k->fd);
        k->fd = -1;
    }
}

/* The machine's counters around one run, read without the GIL (evidence.h). */
#define _GNU_SOURCE
#include "evidence.h"
#include "keptfd.h"

#define PY_SSIZE_T_CLEAN
#include <Python.h>  /* PyMem_Raw*: allowed without the GIL, seen by tracemalloc */

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
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

/* ---------------------------------------------------------------- the /proc files kept open
 *
 * Every reading reads the same five files: PSI's three, /proc/stat and /proc/vmstat. Opening
 * one was most of its cost (a path walk and a seq_file made: a PSI file took ~5 us to open,
 * read to EOF and close on the 2-core VM, ~1 us to pread when open), and a run takes two
 * readings on its critical path. So they stay open for the process, as the kernel-log cursor
 * does, and each reading preads from offset 0, which makes the text anew (the fingerprint's
 * /proc files work the same way, fingerprint.c). Each is checked before use (keptfd.h): a
 * number that code closing descriptors it does not own gave to another file is left to its
 * new owner, and ours opened again. A
 * fork's child closes its copies (it shares the open files, and a read of several chunks
 * would race with the parent's) and opens its own; each file's lock is made anew there. */
enum { KF_PSI, KF_STAT = EV_PSI_RESOURCES, KF_VMSTAT, KF_N };

static const char *const kf_paths[KF_N] = {
    "/proc/pressure/cpu", "/proc/pressure/memory", "/proc/pressure/io", "/proc/stat",
    "/proc/vmstat",
};

static struct kept_file {
    pthread_mutex_t lock;  /* held while a reading uses it (one thread at a time) */
    struct pg_kept k;      /* fd -1: not open */
} kf[KF_N] = {
    {PTHREAD_MUTEX_INITIALIZER, {-1, 0, 0}}, {PTHREAD_MUTEX_INITIALIZER, {-1, 0, 0}},
    {PTHREAD_MUTEX_INITIALIZER, {-1, 0, 0}}, {PTHREAD_MUTEX_INITIALIZER, {-1, 0, 0}},
    {PTHREAD_MUTEX_INITIALIZER, {-1, 0, 0}},
};

static pthread_once_t kf_once = PTHREAD_ONCE_INIT;

/* Around a fork: every kept file's lock held, so that the child never sees one half opened. */
static void kf_lock_for_fork(void)
{
    for (int i = 0; i < KF_N; i++)
        pthread_mutex_lock(&kf[i].lock);
}

static void kf_unlock_after_fork(void)
{
    for (int i = KF_N - 1; i >= 0; i--)
        pthread_mutex_unlock(&kf[i].lock);
}

static void kf_after_fork_child(void)
{
    for (int i = 0; i < KF_N; i++) {
        pthread_mutex_init(&kf[i].lock, NULL);
        pg_kept_close(&kf[i].k);  /* the child's copy: the parent's stays open */
    }
}

/* Set once the fork handlers are in: without them a fork's child would share the files (and a
 * read of several chunks with its parent), so nothing is kept open. */
static int kf_forksafe;

static void kf_register_fork_handler(void)
{
    kf_forksafe = pthread_atfork(kf_lock_for_fork, kf_unlock_after_fork, kf_after_fork_child) == 0;
}

/* Lock kept file i; return its fd, opened now if need be, or -1. kf_done unlocks it. */
static int kf_take(int i)
{
    pthread_once(&kf_once, kf_register_fork_handler);
    pthread_mutex_lock(&kf[i].lock);
    /* -1: no PSI in this kernel, out of fds...: this reading goes without */
    return pg_kept_open(&kf[i].k, kf_paths[i], O_RDONLY);
}

static void kf_done(int i)
{
    if (!kf_forksafe)  /* no fork handlers: opened and closed per use */
        pg_kept_close(&kf[i].k);
    pthread_mutex_unlock(&kf[i].lock);
}

/* pread fd at off, retrying EINTR. */
static ssize_t pread_retry(int fd, char *buf, size_t n, off_t off)
{
    ssize_t got;
    do
        got = pread(fd, buf, n, off);
    while (got < 0 && errno == EINTR);
    return got;
}

/* Read at most cap - 1 bytes of kept file i from its start into buf, NUL-terminated. Return
 * the length, or -1. For PSI's files only: each is one text made whole (pg_pread_text stops at
 * a short read). A file made line by line returns at most a page per read: for_each_line
 * reads those to EOF. */
static ssize_t read_kept(int i, char *buf, size_t cap)
{
    int fd = kf_take(i);
    ssize_t n = fd < 0 ? -1 : pg_pread_text(fd, buf, cap - 1);
    kf_done(i);
    if (n >= 0)
        buf[n] = '\0';
    return n;
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
    if (read_kept(KF_PSI + i, buf, sizeof(buf)) <= 0)
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

/* Call fn(line, ctx) for each line of kept file i (NUL-terminated, without its '\n') until fn
 * returns nonzero, reading through a small buffer on the stack: /proc/stat and /proc/vmstat
 * are several KiB and read twice a run, and a heap buffer each time is churn (and, under
 * ASan, quarantined megabytes). A line longer than the buffer ends the reading. Return -1 if
 * the file could not be opened, else 0. */
static int for_each_line(int i, int (*fn)(const char *line, void *ctx), void *ctx)
{
    char buf[LINE_BUF];
    size_t have = 0;
    off_t off = 0;
    int fd = kf_take(i), stop = 0;
    if (fd < 0) {
        kf_done(i);
        return -1;
    }
    while (!stop) {
        char *line = buf, *eol;
        /* to EOF (0): a file made line by line (vmstat) returns at most a page per read */
        ssize_t n = pread_retry(fd, buf + have, sizeof(buf) - 1 - have, off);
        if (n <= 0)
            break;
        off += n;
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
    kf_done(i);
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
    for_each_line(KF_STAT, busy_line, &c);
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
    for_each_line(KF_VMSTAT, vmstat_line, m);
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

/* ---------------------------------------------------------------- the kernel log
 *
 * One cursor on /dev/kmsg for the process's life, shared by every run and thread (issue 15).
 * Opening one per run cost ~8% of the caller's CPU for /bin/true: devkmsg_open walks the
 * ring for its first valid record (prb_first_valid_seq) and SEEK_END walks it again. A run
 * now reads what is pending when it starts (a poll, most of the time) and marks how many
 * records the cursor has read; at its end it reads on and takes the OOM-looking records
 * whose index is at or past its mark, from a ring of the newest ones. Records lost (the
 * kernel overwrote them before they were read, or a flood was skipped) take an index of their
 * own, so a run whose window holds a loss says its log is incomplete, and only that run.
 *
 * Fork: a child of fork() would share the cursor's file (its position is the open file's),
 * so the child handler drops it (closing the child's copy only) and the next run in the child
 * opens its own; the lock is made anew there, since another thread may have held it. */

#define KMSG_RING 64
#define KMSG_SKIP_AT 1000  /* records pending at a start: past this, skip to the end */

static struct {
    pthread_mutex_t lock;
    struct pg_kept cur;            /* fd -1: not open (never yet, or it failed: tried again) */
    uint64_t read;                 /* records read (and gaps counted) so far */
    int64_t lost_at;               /* the newest loss's index, -1: none */
    uint64_t kept;                 /* OOM-looking records ever kept: ring slot = n % RING */
    uint64_t index[KMSG_RING];
    char line[KMSG_RING][EV_KMSG_LINE_MAX + 1];
} tail = {PTHREAD_MUTEX_INITIALIZER, {-1, 0, 0}, 0, -1, 0, {0}, {{0}}};

static pthread_once_t tail_once = PTHREAD_ONCE_INIT;

static void tail_after_fork_child(void)
{
    pthread_mutex_init(&tail.lock, NULL);
    pg_kept_close(&tail.cur);  /* the child's copy: the parent's cursor is left where it was */
}

static void tail_register_fork_handler(void)
{
    pthread_atfork(NULL, NULL, tail_after_fork_child);
}

/* Open the cursor at the end of the log (lock held). 0, or the errno. */
static int tail_open(void)
{
    int fd = pg_kept_open(&tail.cur, "/dev/kmsg", O_RDONLY | O_NONBLOCK);
    if (fd < 0)  /* not root with kernel.dmesg_restrict=1; a container without it */
        return errno;
    if (lseek(fd, 0, SEEK_END) < 0) {
        int err = errno;
        close(fd);
        tail.cur.fd = -1;
        return err;
    }
    return 0;
}

/* A gap in the indices where records were lost (lock held). */
static void tail_lost(void)
{
    tail.lost_at = (int64_t)tail.read++;
}

/* Lock held: a cursor whose number code that does not own it closed (and maybe gave to
 * another file) is forgotten, not closed, and what was logged since its last read is a loss
 * for the runs in flight. */
static void tail_forget_if_replaced(void)
{
    if (tail.cur.fd >= 0 && !pg_kept_ours(&tail.cur)) {
        tail.cur.fd = -1;
        tail_lost();
    }
}

/* Keep the first line of an OOM-looking record in the ring (retest.oom parses it). */
static void tail_keep(const char *rec, size_t len)
{
    const char *eol = memchr(rec, '\n', len);
    size_t line = eol ? (size_t)(eol - rec) : len;
    uint64_t slot;
    if (line > EV_KMSG_LINE_MAX)
        line = EV_KMSG_LINE_MAX;
    if (!memmem(rec, line, "Killed process ", 15) && !memmem(rec, line, "oom-kill:", 9))
        return;
    slot = tail.kept++ % KMSG_RING;
    memcpy(tail.line[slot], rec, line);
    tail.line[slot][line] = '\0';
    tail.index[slot] = tail.read;
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

/* Read every record pending at the cursor (lock held); at a start, a flood is skipped. */
static void tail_drain(int starting)
{
    char *buf;
    int i;
    if (!kmsg_pending(tail.cur.fd))
        return;  /* most runs: nothing was logged, nothing to allocate */
    if (!(buf = PyMem_RawMalloc(KMSG_RECORD_MAX))) {
        tail_lost();
        return;
    }
    for (i = 0; i < EV_KMSG_READ_MAX; i++) {
        ssize_t n;
        if (starting && i == KMSG_SKIP_AT) {  /* logged before this run: its window is after */
            if (lseek(tail.cur.fd, 0, SEEK_END) >= 0) {
                tail_lost();
                break;
            }
        }
        n = read(tail.cur.fd, buf, KMSG_RECORD_MAX);  /* one record per read */
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EPIPE) {  /* the ring overwrote records we had not read */
            tail_lost();
            continue;
        }
        if (n <= 0) {
            if (n < 0 && errno != EAGAIN)
                tail_lost();  /* cannot say what the log holds */
            break;
        }
        tail_keep(buf, (size_t)n);
        tail.read++;
    }
    if (i == EV_KMSG_READ_MAX)
        tail_lost();  /* a flood of records: gave up */
    PyMem_RawFree(buf);
}

void ev_kmsg_open(struct ev_kmsg *k)
{
    memset(k, 0, sizeof(*k));
    pthread_once(&tail_once, tail_register_fork_handler);
    pthread_mutex_lock(&tail.lock);
    tail_forget_if_replaced();
    k->open_errno = tail.cur.fd >= 0 ? 0 : tail_open();
    if (k->open_errno == 0) {
        tail_drain(1);
        k->mark = tail.read;
        k->marked = 1;
    }
    pthread_mutex_unlock(&tail.lock);
}

/* Copy the ring's records at or past the mark, oldest first, into k->kept (lock held). */
static void tail_copy(struct ev_kmsg *k)
{
    uint64_t first = tail.kept > KMSG_RING ? tail.kept - KMSG_RING : 0;
    if (first > 0 && tail.index[first % KMSG_RING] >= k->mark)
        k->complete = 0;  /* records of this window may have left the ring */
    for (uint64_t n = first; n < tail.kept; n++) {
        uint64_t slot = n % KMSG_RING;
        size_t len;
        char *copy;
        if (tail.index[slot] < k->mark)
            continue;
        len = strlen(tail.line[slot]);
        if (k->n_kept == EV_KMSG_KEEP_MAX || !(copy = PyMem_RawMalloc(len + 1))) {
            k->complete = 0;
            return;
        }
        memcpy(copy, tail.line[slot], len + 1);
        k->kept[k->n_kept++] = copy;
    }
}

void ev_kmsg_collect(struct ev_kmsg *k)
{
    if (!k->marked) {
        k->complete = 0;
        return;
    }
    if (!k->collected)
        k->complete = 1;  /* a second collect goes on from where the first stopped */
    k->collected = 1;
    pthread_mutex_lock(&tail.lock);
    tail_forget_if_replaced();  /* during the run: its log is incomplete */
    if (tail.cur.fd >= 0)  /* else a fork child's run, started in the parent: nothing to read */
        tail_drain(0);
    else
        k->complete = 0;
    if (tail.lost_at >= 0 && (uint64_t)tail.lost_at >= k->mark)
        k->complete = 0;
    tail_copy(k);
    k->mark = tail.read;
    pthread_mutex_unlock(&tail.lock);
}

void ev_kmsg_free(struct ev_kmsg *k)
{
    for (int i = 0; i < k->n_kept; i++)
        PyMem_RawFree(k->kept[i]);
    k->n_kept = 0;
}

/* cgroup v2 mode of the runner (issue 10): the helpers of cgroup.h.
 *
 * A cgroup is the kernel's own answer to "which processes belong to this run": membership
 * is inherited at fork, no process can leave it without write access to another cgroup,
 * cgroup.kill kills every member atomically (new forks included), and cgroup.events says
 * when the last member has exited (poll()able). The subreaper walk needs /proc, pidfds and
 * care about pid reuse to approach that; here the kernel keeps the set.
 */
#define _GNU_SOURCE
#include "cgroup.h"
#include "fnv.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_S 1000000000LL
#define NS_PER_MS 1000000LL

/* Return CLOCK_MONOTONIC in nanoseconds. */
static int64_t cg_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NS_PER_S + ts.tv_nsec;
}

int cg_open(const char *path)
{
    return open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
}

int cg_open_file(int dfd, const char *file, int flags)
{
    int fd;
    do {
        fd = openat(dfd, file, flags | O_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    return fd;
}

int cg_write(int dfd, const char *file, const char *text)
{
    size_t len = strlen(text);
    ssize_t n;
    int fd = cg_open_file(dfd, file, O_WRONLY), saved;
    if (fd < 0)
        return -1;
    do {
        n = write(fd, text, len);
    } while (n < 0 && errno == EINTR);
    saved = errno;
    close(fd);
    errno = saved;
    return n == (ssize_t)len ? 0 : -1;
}

/* Read file of cgroup dfd (or the open fd, from offset 0) into buf, NUL-terminated; a text
 * longer than size - 1 is cut. Return its length or -1 with errno. */
static ssize_t cg_read(int dfd, int fd, const char *file, char *buf, size_t size)
{
    int own = fd < 0, saved;
    size_t got = 0;
    if (own && (fd = cg_open_file(dfd, file, O_RDONLY)) < 0)
        return -1;
    while (got + 1 < size) {
        size_t room = size - 1 - got;
        ssize_t n = pread(fd, buf + got, room, (off_t)got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            saved = errno;
            if (own)
                close(fd);
            errno = saved;
            return -1;
        }
        got += (size_t)n;
        /* A cgroup file is a seq_file: one read gets as much of its text as fits, so a read
         * short of the room is the end; the read that would return 0 is saved (issue 15). */
        if ((size_t)n < room)
            break;
    }
    if (own)
        close(fd);
    buf[got] = '\0';
    return (ssize_t)got;
}

/* Return the number after "key " at the start of a line of text, or -1. */
static int64_t cg_field(const char *text, const char *key)
{
    size_t klen = strlen(key);
    for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
        if (strncmp(p, key, klen) == 0 && p[klen] == ' ')
            return strtoll(p + klen + 1, NULL, 10);
    }
    return -1;
}

int cg_populated(int dfd, int events_fd)
{
    char buf[256];
    if (cg_read(dfd, events_fd, "cgroup.events", buf, sizeof(buf)) < 0)
        return -1;
    return cg_field(buf, "populated") > 0;
}

long cg_read_procs(int dfd, pid_t *pids, long cap)
{
    char buf[4096];
    long count = 0, pid = 0;
    int in_number = 0, fd = cg_open_file(dfd, "cgroup.procs", O_RDONLY), saved;
    if (fd < 0)
        return -1;
    for (;;) {
        ssize_t n = read(fd, buf, sizeof(buf));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            saved = errno;
            close(fd);
            errno = saved;
            return -1;
        }
        /* one pid per line; a number ends at '\n' or at EOF, never at a buffer boundary */
        for (ssize_t i = 0; i <= n; i++) {
            if (i == n && n != 0)
                break;
            if (n != 0 && buf[i] >= '0' && buf[i] <= '9') {
                pid = pid * 10 + (buf[i] - '0');
                in_number = 1;
                continue;
            }
            if (in_number && pid > 0) {  /* 0: a member outside our pid namespace */
                if (count < cap)
                    pids[count] = (pid_t)pid;
                count++;
            }
            pid = 0;
            in_number = 0;
        }
        if (n == 0)
            break;
    }
    close(fd);
    return count;
}

int cg_kill(int dfd)
{
    pid_t pids[512];
    long n;
    if (cg_write(dfd, "cgroup.kill", "1") == 0)
        return 0;
    if (errno != ENOENT && errno != EACCES)
        return -1;
    /* Before Linux 5.14: a frozen member cannot fork, so one pass over cgroup.procs reaches
     * everyone who was frozen in time; the caller repeats while the cgroup is populated. */
    cg_write(dfd, "cgroup.freeze", "1");
    n = cg_read_procs(dfd, pids, 512);
    for (long i = 0; i < n && i < 512; i++)
        kill(pids[i], SIGKILL);
    cg_write(dfd, "cgroup.freeze", "0");
    return n < 0 ? -1 : 0;
}

int cg_wait_empty(int dfd, int64_t timeout_ns)
{
    int64_t end = timeout_ns < 0 ? -1 : cg_now_ns() + timeout_ns;
    int fd = cg_open_file(dfd, "cgroup.events", O_RDONLY), rc = -1;
    if (fd < 0)
        return -1;
    for (;;) {
        struct pollfd pfd = {fd, POLLPRI, 0};
        int64_t left;
        int populated = cg_populated(dfd, fd), ms;
        if (populated <= 0) {
            rc = populated < 0 ? -1 : 1;
            break;
        }
        left = end < 0 ? 100 * NS_PER_MS : end - cg_now_ns();
        if (left <= 0) {
            rc = 0;
            break;
        }
        /* POLLPRI comes with every change of cgroup.events; the 100 ms cap is a belt against
         * a missed edge, not the mechanism */
        ms = (int)((left > 100 * NS_PER_MS ? 100 * NS_PER_MS : left) / NS_PER_MS) + 1;
        if (poll(&pfd, 1, ms) < 0 && errno != EINTR)
            break;
    }
    close(fd);
    return rc;
}

void cg_files_init(struct cg_files *f)
{
    f->cpu_stat = f->cpu_pressure = -1;
    for (int i = 0; i < CG_MADE_FILES; i++)
        f->made[i] = -1;
}

void cg_files_close(struct cg_files *f)
{
    if (f->cpu_stat >= 0)
        close(f->cpu_stat);
    if (f->cpu_pressure >= 0)
        close(f->cpu_pressure);
    for (int i = 0; i < CG_MADE_FILES; i++)
        if (f->made[i] >= 0)
            close(f->made[i]);
    cg_files_init(f);
}

/* The open fd of file in *slot (opened now if it is not: -1), or -1 with errno (-2: absent,
 * known from an earlier try: ENOENT). */
static int cg_kept_fd(int dfd, int *slot, const char *file)
{
    if (*slot == -1) {
        *slot = cg_open_file(dfd, file, O_RDONLY);
        if (*slot < 0 && errno == ENOENT)
            *slot = -2;
    }
    if (*slot == -2)
        errno = ENOENT;
    return *slot < 0 ? -1 : *slot;
}

/* Read file of dfd through *slot (kept open), as cg_read. Return its length or -1. */
static ssize_t cg_read_kept(int dfd, int *slot, const char *file, char *buf, size_t size)
{
    int fd = cg_kept_fd(dfd, slot, file);
    return fd < 0 ? -1 : cg_read(dfd, fd, file, buf, size);
}

void cg_read_cpu(int dfd, struct cg_files *f, struct cg_usage *u)
{
    char buf[1024];
    u->usage_us = u->user_us = u->system_us = -1;
    if (cg_read_kept(dfd, &f->cpu_stat, "cpu.stat", buf, sizeof(buf)) >= 0) {
        u->usage_us = cg_field(buf, "usage_usec");
        u->user_us = cg_field(buf, "user_usec");
        u->system_us = cg_field(buf, "system_usec");
    }
}

int64_t cg_read_cpu_some(int dfd, struct cg_files *f)
{
    char buf[256];
    const char *total;
    if (cg_read_kept(dfd, &f->cpu_pressure, "cpu.pressure", buf, sizeof(buf)) < 0 ||
        strncmp(buf, "some ", 5) != 0 || (total = strstr(buf, " total=")) == NULL)
        return -1;
    return strtoll(total + 7, NULL, 10);
}

void cg_read_usage(int dfd, struct cg_files *f, int cpu_only, struct cg_usage *u)
{
    char buf[1024];
    u->memory_peak = u->pids_peak = u->oom_kill = u->oom_group_kill = -1;
    cg_read_cpu(dfd, f, u);
    if (cpu_only)
        return;
    if (cg_read(dfd, -1, "memory.events", buf, sizeof(buf)) > 0) {
        u->oom_kill = cg_field(buf, "oom_kill");
        u->oom_group_kill = cg_field(buf, "oom_group_kill");
        if (cg_read(dfd, -1, "memory.peak", buf, sizeof(buf)) > 0)
            u->memory_peak = strtoll(buf, NULL, 10);
    }
    if (cg_read(dfd, -1, "pids.peak", buf, sizeof(buf)) > 0)
        u->pids_peak = strtoll(buf, NULL, 10);
}

/* What a run's cgroup holds when it is made, in the core files a member may write (a test
 * of cgroup code, or anything running as the cgroup's owner): cg_reusable compares them. */
static const struct {
    const char *file;
    const char *text;
    int optional;  /* absent on older kernels: then nothing to compare */
} made_state[CG_MADE_FILES] = {
    {"cgroup.controllers", "", 0},  /* also rules out memory.peak and pids.peak, not resettable */
    {"cgroup.freeze", "0\n", 0},     /* a frozen cgroup would freeze the next command */
    {"cgroup.type", "domain\n", 0},  /* threaded: the next clone into it would fail */
    {"cgroup.max.descendants", "max\n", 0},
    {"cgroup.max.depth", "max\n", 0},
    {"cgroup.pressure", "1\n", 1},   /* Linux 6.5: PSI can be switched off per cgroup */
    {"cgroup.stat", NULL, 0},       /* nr_descendants 0: an empty child cgroup left behind
                                     * would be this cgroup's forever */
};

/* The files of a run's cgroup whose mode and owner the runner relies on, after its directory
 * (index 0: "" is the directory itself): a chmod of cgroup.procs by the command would make the
 * next clone3 into it fail for an unprivileged caller; of cgroup.kill, the kill. */
static const char *const made_inodes[CG_MADE_INODES] = {
    "", "cgroup.procs", "cgroup.kill", "cgroup.events", "cgroup.freeze",
};

/* The cgroup attach types of BPF programs (linux/bpf.h enum bpf_attach_type, numbered here:
 * old headers lack the newer ones; a type the kernel does not know answers EINVAL). */
static const uint32_t bpf_cgroup_types[] = {
    0, 1, 2, 3,         /* INET_INGRESS, INET_EGRESS, INET_SOCK_CREATE, SOCK_OPS */
    6,                  /* DEVICE */
    8, 9, 10, 11, 12, 13, 14, 15,  /* INET4/6 BIND, CONNECT, POST_BIND; UDP4/6 SENDMSG */
    18, 19, 20, 21, 22, /* SYSCTL, UDP4/6 RECVMSG, GETSOCKOPT, SETSOCKOPT */
    29, 30, 31, 32, 34, /* INET4/6 GETPEERNAME, GETSOCKNAME; INET_SOCK_RELEASE */
    43,                 /* LSM_CGROUP */
    49, 50, 51, 52, 53, /* UNIX CONNECT, SENDMSG, RECVMSG, GETPEERNAME, GETSOCKNAME (6.7) */
};

/* union bpf_attr as BPF_PROG_QUERY reads it (linux/bpf.h), without the header. */
struct cg_bpf_query {
    uint32_t target_fd, attach_type, query_flags, attach_flags;
    uint64_t prog_ids;
    uint32_t prog_cnt, pad;
    uint64_t prog_attach_flags;
};

#define CG_BPF_PROG_QUERY 16

int cg_snapshot(int dfd, struct cg_made *m)
{
    char names[1024];
    long n;
    memset(m, 0, sizeof(*m));
    for (int i = 0; i < CG_MADE_INODES; i++) {
        struct stat st;  /* raw system calls: old glibc headers inline fstat as __fxstat */
        long rc = i == 0 ? syscall(SYS_fstat, dfd, &st)
                         : syscall(SYS_newfstatat, dfd, made_inodes[i], &st, 0);
        if (rc < 0)
            return -1;
        m->mode[i] = (uint32_t)st.st_mode;
        m->uid[i] = (uint32_t)st.st_uid;
        m->gid[i] = (uint32_t)st.st_gid;
    }
    /* extended attribute names (user.oomd_avoid steers systemd-oomd; trusted.* as root) */
    m->xattrs = PG_FNV_OFFSET;
    n = syscall(SYS_flistxattr, dfd, names, sizeof(names));
    if (n < 0 && errno != ENOTSUP && errno != EOPNOTSUPP)
        return -1;  /* ERANGE: more names than we look at, not as made */
    pg_fnv_mix(&m->xattrs, &n, sizeof(n));
    if (n > 0)
        pg_fnv_mix(&m->xattrs, names, (size_t)n);
    return 0;
}

/* Return 1 if a BPF program is attached to the cgroup dfd (it stays there after the process
 * that attached it exits: a device filter would deny the next command /dev/null), or if that
 * cannot be known; 0 if none, or if we may not ask (EPERM: without CAP_NET_ADMIN neither could
 * the command attach one, unless it gained privileges the caller has not: not looked for). */
static int cg_has_bpf(int dfd)
{
    for (size_t i = 0; i < sizeof(bpf_cgroup_types) / sizeof(bpf_cgroup_types[0]); i++) {
        struct cg_bpf_query q;
        memset(&q, 0, sizeof(q));
        q.target_fd = (uint32_t)dfd;
        q.attach_type = bpf_cgroup_types[i];
        if (syscall(SYS_bpf, CG_BPF_PROG_QUERY, &q, sizeof(q)) == 0) {
            if (q.prog_cnt > 0)
                return 1;
            continue;
        }
        if (errno == EPERM || errno == ENOSYS)
            return 0;  /* asked first: no type was queried */
        if (errno != EINVAL)
            return 1;  /* EINVAL: a type this kernel does not have */
    }
    return 0;
}

int cg_reusable(int dfd, struct cg_files *f, const struct cg_made *made)
{
    char buf[512];
    struct cg_made now;
    if (cg_snapshot(dfd, &now) < 0 || memcmp(&now, made, sizeof(now)) != 0)
        return 0;
    for (int i = 0; i < CG_MADE_FILES; i++) {
        if (cg_read_kept(dfd, &f->made[i], made_state[i].file, buf, sizeof(buf)) < 0) {
            if (made_state[i].optional && errno == ENOENT)
                continue;
            return 0;
        }
        if (made_state[i].text ? strcmp(buf, made_state[i].text) != 0
                               : cg_field(buf, "nr_descendants") != 0)
            return 0;
    }
    return !cg_has_bpf(dfd);
}

int cg_no_controllers(int dfd, struct cg_files *f)
{
    char buf[512];
    return cg_read_kept(dfd, &f->made[0], made_state[0].file, buf, sizeof(buf)) >= 0 &&
           strcmp(buf, made_state[0].text) == 0;
}

int cg_remove(const char *path)
{
    for (int attempt = 0; attempt < 200; attempt++) {
        struct timespec pause = {0, NS_PER_MS};
        if (rmdir(path) == 0 || errno == ENOENT)
            return 0;
        if (errno != EBUSY)
            return -1;
        nanosleep(&pause, NULL);
    }
    errno = EBUSY;
    return -1;
}

/* Idle shepherds and the fingerprint of inherited state (issue 15).
 *
 * A shepherd is started by posix_spawn from the calling thread, so it, and every command it
 * starts, inherits that thread's state at that moment: credentials, umask, rlimits, nice and
 * scheduling, CPU affinity, I/O priority, oom_score_adj, cgroups, namespaces, cwd, root. A
 * shepherd kept idle for a later run would hand its commands that old state instead of the
 * caller's state at the time of the call. Rather than re-applying each attribute in the
 * child (some cannot be undone without privilege: a raised nice, a lowered rlimit, dropped
 * credentials, a namespace left), each idle shepherd carries the fingerprint of the state it
 * was started from, and a run takes only one whose fingerprint equals the caller's now: any
 * difference starts a fresh shepherd, which inherits the new state exactly as it always did.
 * Signal dispositions and the signal mask are not in it: the shepherd resets both for every
 * command (posix_spawn's SETSIGDEF and SETSIGMASK, then reset_signals_for_exec). The
 * environment and the cwd (as an fd) travel with each request.
 *
 * The pool is the process's (shepherds are its children), behind one mutex; a forked child
 * forgets it (pthread_atfork): the idle shepherds are its parent's.
 */
#define _GNU_SOURCE
#include "pool.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------- the fingerprint */

#define FNV_OFFSET 14695981039346656037ULL
#define FNV_PRIME 1099511628211ULL

/* Mix n bytes into the FNV-1a hash *h. */
static void mix(uint64_t *h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        *h ^= b[i];
        *h *= FNV_PRIME;
    }
}

/* Mix a syscall's result and its errno (a failure is part of the state too). */
static void mix_long(uint64_t *h, long v)
{
    int err = v < 0 ? errno : 0;
    mix(h, &v, sizeof(v));
    mix(h, &err, sizeof(err));
}

/* Read path (small /proc file) into buf. Return the length, or -1 with errno. A /proc file
 * of one seq_file record gives all it has in one read: a short read is its end (one read
 * call fewer per file). */
static ssize_t read_file(int dfd, const char *path, char *buf, size_t size)
{
    ssize_t n, total = 0;
    int fd = openat(dfd, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    while ((size_t)total < size) {
        n = read(fd, buf + total, size - (size_t)total);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        total += n;
        if ((size_t)total < size / 2)
            break;
    }
    close(fd);
    return total;
}

/* The lines of /proc/thread-self/status that fork and exec pass on: credentials and
 * capabilities, umask, no_new_privs and seccomp, the thread's allowed CPUs and memory nodes.
 * (SigIgn and SigBlk are reset for every command; the rest is the thread's own running
 * state: memory, times, switches.) */
static const char *const STATUS_KEYS[] = {
    "Umask:", "Uid:", "Gid:", "Groups:", "CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:",
    "NoNewPrivs:", "Seccomp:", "Seccomp_filters:", "Cpus_allowed_list:", "Mems_allowed_list:",
    "Speculation_Store_Bypass:", "SpeculationIndirectBranch:", NULL,
};

/* Mix the inherited lines of status text buf[0..n). */
static void mix_status(uint64_t *h, const char *buf, size_t n)
{
    const char *p = buf, *end = buf + n;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t len = nl ? (size_t)(nl - p) : (size_t)(end - p);
        if (!memchr("UGCNSM", *p, 6)) {  /* no key starts otherwise: most lines end here */
            p += len + 1;
            continue;
        }
        for (const char *const *k = STATUS_KEYS; *k; k++) {
            size_t klen = strlen(*k);
            if (len >= klen && memcmp(p, *k, klen) == 0) {
                mix(h, p, len);
                break;
            }
        }
        p += len + 1;
    }
}

/* The namespaces a child is made in (the _for_children ones where they differ). */
static const char *const NAMESPACES[] = {
    "cgroup", "ipc", "mnt", "net", "pid_for_children", "time_for_children", "user", "uts", NULL,
};

/* Mix the identity of every namespace of the calling thread. Return 0, or -1. */
static int mix_namespaces(uint64_t *h)
{
    char link[64];
    int dfd = open("/proc/thread-self/ns", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return -1;
    for (const char *const *ns = NAMESPACES; *ns; ns++) {
        ssize_t n = readlinkat(dfd, *ns, link, sizeof(link));
        mix_long(h, n);  /* time_for_children is missing before Linux 5.6: the same each time */
        if (n > 0)
            mix(h, link, (size_t)n);
    }
    close(dfd);
    return 0;
}

/* sched_getattr's struct (the kernel's struct sched_attr, first version: 56 bytes). */
struct pg_sched_attr {
    uint32_t size, policy;
    uint64_t flags;
    int32_t nice;
    uint32_t priority;
    uint64_t runtime, deadline, period;
    uint32_t util_min, util_max;
};

/* Mix the calling thread's scheduling: policy, nice, priority, utilization clamps; I/O
 * priority; timer slack. */
static void mix_scheduling(uint64_t *h)
{
    struct pg_sched_attr attr;
    long rc;
    memset(&attr, 0, sizeof(attr));
#ifdef SYS_sched_getattr
    rc = syscall(SYS_sched_getattr, 0, &attr, sizeof(attr), 0);
#else
    rc = -1;
    errno = ENOSYS;
#endif
    if (rc < 0) {  /* before Linux 3.14: the older calls */
        attr.policy = (uint32_t)sched_getscheduler(0);
        errno = 0;
        attr.nice = getpriority(PRIO_PROCESS, 0);
    }
    attr.size = 0;
    mix(h, &attr, sizeof(attr));
#ifdef SYS_ioprio_get
    mix_long(h, syscall(SYS_ioprio_get, 1 /* IOPRIO_WHO_PROCESS */, 0));
#endif
    mix_long(h, prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0));
}

/* Mix the process's rlimits, personality, securebits, THP setting and memory policy. */
static void mix_limits(uint64_t *h)
{
    for (int r = 0; r < RLIM_NLIMITS; r++) {
        struct rlimit rl = {0, 0};
        mix_long(h, prlimit(0, (__rlimit_resource_t)r, NULL, &rl));
        mix(h, &rl, sizeof(rl));
    }
    mix_long(h, personality(0xffffffff));
    mix_long(h, prctl(PR_GET_SECUREBITS, 0, 0, 0, 0));
#ifdef PR_GET_THP_DISABLE
    mix_long(h, prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0));
#endif
#ifdef SYS_get_mempolicy
    {
        int mode = -1;
        mix_long(h, syscall(SYS_get_mempolicy, &mode, NULL, 0, NULL, 0));
        mix(h, &mode, sizeof(mode));
    }
#endif
}

/* Mix the identity (device, inode) of path: the root is inherited as a directory, not a name.
 * (The cwd is sent with each request instead: a directory removed and made again may get the
 * old inode number back.) */
static int mix_dir(uint64_t *h, const char *path)
{
    struct stat st;
    if (stat(path, &st) < 0)
        return -1;
    mix(h, &st.st_dev, sizeof(st.st_dev));
    mix(h, &st.st_ino, sizeof(st.st_ino));
    return 0;
}

int pg_fingerprint(uint64_t *fp)
{
    char buf[8192];
    uint64_t h = FNV_OFFSET;
    ssize_t n = read_file(AT_FDCWD, "/proc/thread-self/status", buf, sizeof(buf));
    pid_t self = getpid();

    if (n <= 0 || (size_t)n == sizeof(buf))
        return -1;  /* no /proc, or more groups than we read: do not guess */
    mix(&h, &self, sizeof(self));
    mix_status(&h, buf, (size_t)n);
    n = read_file(AT_FDCWD, "/proc/self/oom_score_adj", buf, sizeof(buf));
    mix_long(&h, n);
    if (n > 0)
        mix(&h, buf, (size_t)n);
    n = read_file(AT_FDCWD, "/proc/self/coredump_filter", buf, sizeof(buf));
    mix_long(&h, n);
    if (n > 0)
        mix(&h, buf, (size_t)n);
    n = read_file(AT_FDCWD, "/proc/self/cgroup", buf, sizeof(buf));
    if (n <= 0 || (size_t)n == sizeof(buf))
        return -1;
    mix(&h, buf, (size_t)n);
    if (mix_namespaces(&h) < 0 || mix_dir(&h, "/") < 0)
        return -1;
    mix_scheduling(&h);
    mix_limits(&h);
    *fp = h;
    return 0;
}

/* ---------------------------------------------------------------- the pool */

struct idle {
    pid_t pid;
    int ctl;
    uint64_t fp;
};

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static struct idle pool[PG_POOL_MAX];
static size_t pool_len;
static pid_t pool_owner;  /* the process whose children they are */
static int pool_disabled; /* pthread_atfork failed (ENOMEM): keep none */

/* Which shepherd serves the run of which thread: the pressure sampler walks the run's tree
 * from it (a pooled shepherd is no new child of the calling thread). Under pool_lock. */
#define PG_RUNNING_MAX 256

static struct {
    pid_t tid, shepherd;
} running[PG_RUNNING_MAX];

/* In a forked child: the idle shepherds are the parent's; close our copies of their sockets
 * (their parent still holds its own) and start empty. Another thread may have held the lock
 * at the fork: it is made anew. */
static void forget_after_fork(void)
{
    for (size_t i = 0; i < pool_len; i++)
        close(pool[i].ctl);
    pool_len = 0;
    memset(running, 0, sizeof(running));
    pthread_mutex_init(&pool_lock, NULL);
}

/* Around a fork: hold the lock, so that the child never sees the pool half-updated. */
static void lock_for_fork(void)
{
    pthread_mutex_lock(&pool_lock);
}

static void unlock_after_fork(void)
{
    pthread_mutex_unlock(&pool_lock);
}

static void register_fork_handler(void)
{
    /* Without it a forked child could use its parent's shepherds: then no pool at all. */
    pool_disabled = pthread_atfork(lock_for_fork, unlock_after_fork, forget_after_fork) != 0;
}

/* Lock the pool; drop it if this process is not its owner (a fork the handler missed:
 * a raw clone). */
static void lock_pool(void)
{
    pthread_once(&pool_once, register_fork_handler);
    pthread_mutex_lock(&pool_lock);
    if (pool_len && pool_owner != getpid()) {
        for (size_t i = 0; i < pool_len; i++)
            close(pool[i].ctl);
        pool_len = 0;
    }
}

int pg_pool_take(uint64_t fp, pid_t *pid, int *ctl)
{
    int found = 0;
    lock_pool();
    for (size_t i = pool_len; i-- > 0;) {  /* the most recently used first */
        if (pool[i].fp == fp) {
            *pid = pool[i].pid;
            *ctl = pool[i].ctl;
            memmove(&pool[i], &pool[i + 1], (pool_len - i - 1) * sizeof(pool[0]));
            pool_len--;
            found = 1;
            break;
        }
    }
    pthread_mutex_unlock(&pool_lock);
    return found;
}

int pg_pool_evict(int keep, pid_t *pid, int *ctl)
{
    int evicted = 0;
    lock_pool();
    if (keep < 0 || pool_len > (size_t)keep) {
        if (pool_len > 0) {  /* the least recently used: it may hold a state nobody asks for */
            *pid = pool[0].pid;
            *ctl = pool[0].ctl;
            memmove(&pool[0], &pool[1], (pool_len - 1) * sizeof(pool[0]));
            pool_len--;
            evicted = 1;
        }
    }
    pthread_mutex_unlock(&pool_lock);
    return evicted;
}

int pg_pool_put(uint64_t fp, pid_t pid, int ctl, int max_idle)
{
    int kept = 0;
    lock_pool();
    if (!pool_disabled && pool_len < (size_t)max_idle && pool_len < PG_POOL_MAX) {
        pool[pool_len].pid = pid;
        pool[pool_len].ctl = ctl;
        pool[pool_len].fp = fp;
        pool_len++;
        pool_owner = getpid();
        kept = 1;
    }
    pthread_mutex_unlock(&pool_lock);
    return kept;
}

void pg_pool_retire(pid_t pid, int ctl)
{
    struct timespec pause = {0, 50 * 1000};
    pid_t got = 0;
    /* An idle shepherd exits when its socket hangs up; shutdown, not only close: a forked
     * child of ours may hold a copy of it. */
    shutdown(ctl, SHUT_RDWR);
    close(ctl);
    for (int i = 0; i < 4000 && got == 0; i++) {  /* ~200 ms at most */
        got = waitpid(pid, NULL, WNOHANG);
        if (got < 0 && errno == EINTR)
            got = 0;
        else if (got == 0)
            nanosleep(&pause, NULL);
    }
    if (got == 0) {
        /* still our unreaped child (waitpid said so): stopped, or stuck. Its pid cannot have
         * been reused; it has no child of its own. */
        kill(pid, SIGKILL);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
    }
}

void pg_pool_give(uint64_t fp, pid_t pid, int ctl, int max_idle)
{
    pid_t old_pid;
    int old_ctl;
    if (max_idle > PG_POOL_MAX)
        max_idle = PG_POOL_MAX;
    while (max_idle > 0 && pg_pool_evict(max_idle - 1, &old_pid, &old_ctl))
        pg_pool_retire(old_pid, old_ctl);
    if (max_idle <= 0 || !pg_pool_put(fp, pid, ctl, max_idle))
        pg_pool_retire(pid, ctl);
}

/* ---------------------------------------------------------------- runs in flight */

void pg_running_set(pid_t tid, pid_t shepherd)
{
    size_t i, free_slot = PG_RUNNING_MAX;
    lock_pool();
    for (i = 0; i < PG_RUNNING_MAX && running[i].tid != tid; i++)  /* its own entry first */
        if (running[i].tid == 0 && free_slot == PG_RUNNING_MAX)
            free_slot = i;
    if (i == PG_RUNNING_MAX)
        i = free_slot;
    if (i < PG_RUNNING_MAX && (shepherd > 0 || running[i].tid == tid)) {
        running[i].tid = shepherd > 0 ? tid : 0;
        running[i].shepherd = shepherd;
    }
    pthread_mutex_unlock(&pool_lock);
}

/* ---------------------------------------------------------------- Python functions */

const char pg_running_shepherd_doc[] =
    "running_shepherd(tid) -> int | None\n\nPrivate: the shepherd serving the run of native "
    "thread tid now, if any.";

PyObject *pg_running_shepherd(PyObject *module, PyObject *arg)
{
    long tid = PyLong_AsLong(arg);
    pid_t found = 0;
    (void)module;
    if (tid == -1 && PyErr_Occurred())
        return NULL;
    lock_pool();
    for (size_t i = 0; i < PG_RUNNING_MAX && !found; i++)
        if (running[i].tid == (pid_t)tid && tid != 0)
            found = running[i].shepherd;
    pthread_mutex_unlock(&pool_lock);
    if (!found)
        Py_RETURN_NONE;
    return PyLong_FromLong(found);
}


const char pg_idle_shepherds_doc[] =
    "idle_shepherds() -> tuple[int, ...]\n\nPrivate: the pids of the idle shepherds kept for "
    "later runs (use retest.proc_group.idle_shepherds).";

PyObject *pg_idle_shepherds(PyObject *module, PyObject *unused)
{
    pid_t pids[PG_POOL_MAX];
    size_t n;
    PyObject *t;
    (void)module;
    (void)unused;
    lock_pool();
    n = pool_len;
    for (size_t i = 0; i < n; i++)
        pids[i] = pool[i].pid;
    pthread_mutex_unlock(&pool_lock);
    t = PyTuple_New((Py_ssize_t)n);
    for (size_t i = 0; t && i < n; i++) {
        PyObject *v = PyLong_FromLong(pids[i]);
        if (!v) {
            Py_CLEAR(t);
            break;
        }
        PyTuple_SET_ITEM(t, (Py_ssize_t)i, v);
    }
    return t;
}

const char pg_close_shepherds_doc[] =
    "close_shepherds() -> int\n\nPrivate: let every idle shepherd go (each exits and is "
    "reaped); return how many (use retest.proc_group.close_shepherds).";

PyObject *pg_close_shepherds(PyObject *module, PyObject *unused)
{
    pid_t pid;
    int ctl;
    long count = 0;
    (void)module;
    (void)unused;
    Py_BEGIN_ALLOW_THREADS
    while (pg_pool_evict(-1, &pid, &ctl)) {
        pg_pool_retire(pid, ctl);
        count++;
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(count);
}

/* The fingerprint of the state a command inherits from the calling thread (issue 15).
 *
 * pool.c keeps an idle shepherd under the fingerprint of the state it was started from, and
 * a run takes only one whose fingerprint equals the caller's now. It is taken before every
 * run, so its cost is every run's: system calls are ~0.2-0.4 us each on the 2-core VM, a
 * /proc open ~4-5 us, a namespace readlink ~2.5 us.
 *
 * Most of what it read was the cost of opening /proc files, not of reading them (measured:
 * status open+read+close 16-21 us, of which 12.6 us is the text itself; oom_score_adj 3.7 us
 * against 0.6 us for a pread; the namespace directory 3.5-4 us). A thread therefore keeps
 * its /proc files open from one run to the next and preads them: the text is made anew on
 * every read (a seq_file read at offset 0), so a kept file says what a fresh one would
 * (fingerprint_files says where the two could differ, and what it does about it).
 * Opening them relative to one /proc/thread-self directory per call saved nothing
 * measurable: the walk of the path is not where the time goes.
 *
 * What is not read from a file cannot be cheaper: status has the only thread-safe view of
 * the umask (umask(2) sets it, and another thread could create a file in between), of the
 * bounding and ambient capability sets (41 prctl calls each, 12-14 us) and of the seccomp
 * filter count; each namespace's identity is one readlink (a pidfd ioctl, 6.11+, costs 5.7
 * us with its fstat and close; statx of the link follows it, 7 us).
 */
#define _GNU_SOURCE
#include "pool.h"
#include "fnv.h"
#include "keptfd.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* ---------------------------------------------------------------- hashing (fnv.h) */

/* Mix a syscall's result and its errno (a failure is part of the state too). */
static void mix_long(uint64_t *h, long v)
{
    int err = v < 0 ? errno : 0;
    pg_fnv_mix(h, &v, sizeof(v));
    pg_fnv_mix(h, &err, sizeof(err));
}

/* ---------------------------------------------------------------- /proc files kept open */

/* The files a thread keeps. status, cgroup and ns are the thread's own (a child inherits the
 * forking thread's credentials, affinity, cgroup and namespaces, not the main thread's);
 * oom_score_adj and coredump_filter are the process's (task/<tid> has no coredump_filter). */
enum { KEPT_NS, KEPT_STATUS, KEPT_CGROUP, KEPT_OOM, KEPT_COREDUMP, KEPT_N };

static const struct {
    const char *path;
    int flags;
} KEPT_PATHS[KEPT_N] = {
    {"/proc/thread-self/ns", O_PATH | O_DIRECTORY},
    {"/proc/thread-self/status", O_RDONLY},
    {"/proc/thread-self/cgroup", O_RDONLY},
    {"/proc/self/oom_score_adj", O_RDONLY},
    {"/proc/self/coredump_filter", O_RDONLY},
};

/* A thread's kept files. Only its thread touches the fds while busy; otherwise only under
 * kept_lock (close_kept_files, the fork handler). */
struct kept_set {
    int owned;                 /* a thread's: its kept_key value points here */
    int busy;                  /* its thread is fingerprinting */
    pid_t pid;                 /* the process that opened them (a fork's child is another) */
    char user_ns[40];          /* the user namespace they were opened in (reopen_if_...) */
    struct pg_kept f[KEPT_N];  /* keptfd.h: each checked before use */
};

/* Threads that keep files at once (5 fds each); any more open and close them per call. */
#define PG_KEPT_THREADS 16

static pthread_mutex_t kept_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t kept_once = PTHREAD_ONCE_INIT;
static pthread_key_t kept_key;
static int kept_ready; /* the key and the fork handler exist: else nothing is kept */
static struct kept_set kept_sets[PG_KEPT_THREADS];

/* Mark every file of s as not open. */
static void init_kept_set(struct kept_set *s)
{
    s->pid = 0;
    s->user_ns[0] = '\0';
    for (int i = 0; i < KEPT_N; i++)
        s->f[i].fd = -1;
}

/* Close all the files of s. */
static void close_kept_set(struct kept_set *s)
{
    for (int i = 0; i < KEPT_N; i++)
        pg_kept_close(&s->f[i]);
}

/* At a thread's exit (its key's destructor): its files are closed and its slot freed. */
static void release_kept_set(void *p)
{
    struct kept_set *s = p;
    pthread_mutex_lock(&kept_lock);
    close_kept_set(s);
    s->owned = 0;
    s->busy = 0;
    pthread_mutex_unlock(&kept_lock);
}

/* Around a fork: hold the lock, so that the child never sees a slot half-claimed. */
static void kept_lock_for_fork(void)
{
    pthread_mutex_lock(&kept_lock);
}

static void kept_unlock_after_fork(void)
{
    pthread_mutex_unlock(&kept_lock);
}

/* In a forked child: every kept fd is a copy of the parent's, naming the parent's files;
 * close them. Only the forking thread goes on: the other threads' slots are free. */
static void kept_forget_after_fork(void)
{
    void *own = pthread_getspecific(kept_key);
    for (int i = 0; i < PG_KEPT_THREADS; i++) {
        close_kept_set(&kept_sets[i]);
        kept_sets[i].owned = own == &kept_sets[i];
        kept_sets[i].busy = 0;
    }
    pthread_mutex_init(&kept_lock, NULL);
}

/* Once per process: the key whose destructor frees a thread's slot, and the fork handler.
 * Without either nothing is kept (a failure is ENOMEM or EAGAIN). */
static void make_kept_key(void)
{
    if (pthread_key_create(&kept_key, release_kept_set) != 0)
        return;
    kept_ready =
        pthread_atfork(kept_lock_for_fork, kept_unlock_after_fork, kept_forget_after_fork) == 0;
}

/* Claim a free slot for the calling thread (under kept_lock). Return it, or NULL if all
 * are taken or the key cannot be set (ENOMEM). */
static struct kept_set *claim_slot(void)
{
    for (int i = 0; i < PG_KEPT_THREADS; i++) {
        struct kept_set *s = &kept_sets[i];
        if (s->owned)
            continue;
        if (pthread_setspecific(kept_key, s) != 0)
            return NULL;
        init_kept_set(s);
        s->owned = 1;
        return s;
    }
    return NULL;
}

/* The calling thread's kept files, marked busy (its slot is claimed at its first call), or
 * scratch with nothing open if it has none: then what is read is opened for this call, and
 * end_kept_files closes it. */
static struct kept_set *begin_kept_files(struct kept_set *scratch)
{
    struct kept_set *s = NULL;
    pthread_once(&kept_once, make_kept_key);
    if (kept_ready) {
        pthread_mutex_lock(&kept_lock);
        s = pthread_getspecific(kept_key);
        if (!s)
            s = claim_slot();
        if (s)
            s->busy = 1;
        pthread_mutex_unlock(&kept_lock);
    }
    if (!s) {
        s = scratch;
        init_kept_set(s);
    }
    return s;
}

/* The fingerprint is taken: s may be closed by close_kept_files again (scratch is closed). */
static void end_kept_files(struct kept_set *s, struct kept_set *scratch)
{
    if (s == scratch) {
        close_kept_set(s);
        return;
    }
    pthread_mutex_lock(&kept_lock);
    s->busy = 0;
    pthread_mutex_unlock(&kept_lock);
}

void pg_fingerprint_close_files(void)
{
    pthread_once(&kept_once, make_kept_key);
    pthread_mutex_lock(&kept_lock);
    for (int i = 0; i < PG_KEPT_THREADS; i++)
        if (kept_sets[i].owned && !kept_sets[i].busy)
            close_kept_set(&kept_sets[i]);
    pthread_mutex_unlock(&kept_lock);
}

/* Make file `which` of s open: the kept one if it still is that file, else opened now.
 * Return its fd, or -1 with errno. */
static int kept_fd(struct kept_set *s, int which)
{
    return pg_kept_open(&s->f[which], KEPT_PATHS[which].path, KEPT_PATHS[which].flags);
}

/* Read kept file `which` of s (a small /proc file) into buf from its start: its text as of
 * now. Return the length, or -1 with errno. */
static ssize_t read_kept(struct kept_set *s, int which, char *buf, size_t size)
{
    int fd = kept_fd(s, which);
    return fd < 0 ? -1 : pg_pread_text(fd, buf, size);
}

/* ---------------------------------------------------------------- what is mixed */

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
                pg_fnv_mix(h, p, len);
                break;
            }
        }
        p += len + 1;
    }
}

/* The namespaces a child is made in (the _for_children ones where they differ); "user"
 * first: reopen_if_user_ns_moved compares it. */
static const char *const NAMESPACES[] = {
    "user", "cgroup", "ipc", "mnt", "net", "pid_for_children", "time_for_children", "uts", NULL,
};

/* Mix the identity of every namespace of the calling thread (readlinkat in its kept ns
 * directory: a link's target is the task's namespace as of the call, whenever the
 * directory was opened); copy the user namespace's to user_ns. Return 0, or -1. */
static int mix_namespaces(uint64_t *h, struct kept_set *s, char *user_ns, size_t size)
{
    char link[64];
    int dfd = kept_fd(s, KEPT_NS);
    if (dfd < 0)
        return -1;
    user_ns[0] = '\0';
    for (const char *const *ns = NAMESPACES; *ns; ns++) {
        ssize_t n = readlinkat(dfd, *ns, link, sizeof(link));
        mix_long(h, n);  /* time_for_children is missing before Linux 5.6: the same each time */
        if (n > 0)
            pg_fnv_mix(h, link, (size_t)n);
        if (ns == NAMESPACES && n > 0 && (size_t)n < size) {
            memcpy(user_ns, link, (size_t)n);
            user_ns[n] = '\0';
        }
    }
    return 0;
}

/* A kept status shows the thread's ids mapped into the user namespace of whoever opened it
 * (file->f_cred), not of the reader: after setns to an unrelated user namespace, ids that
 * do not map there would all read 65534 where a fresh open tells them apart. So the files
 * of s opened in another user namespace than the thread's now (user_ns) are opened again.
 * (The namespace links are read at the call, whoever opened their directory.) */
static void reopen_if_user_ns_moved(struct kept_set *s, const char *user_ns)
{
    if (strcmp(s->user_ns, user_ns) == 0)
        return;
    for (int i = 0; i < KEPT_N; i++)
        if (i != KEPT_NS)
            pg_kept_close(&s->f[i]);
    strncpy(s->user_ns, user_ns, sizeof(s->user_ns) - 1);
    s->user_ns[sizeof(s->user_ns) - 1] = '\0';
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
    pg_fnv_mix(h, &attr, sizeof(attr));
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
        pg_fnv_mix(h, &rl, sizeof(rl));
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
        pg_fnv_mix(h, &mode, sizeof(mode));
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
    pg_fnv_mix(h, &st.st_dev, sizeof(st.st_dev));
    pg_fnv_mix(h, &st.st_ino, sizeof(st.st_ino));
    return 0;
}

/* Mix the /proc files of s: status's inherited lines, oom_score_adj, coredump_filter, the
 * thread's cgroups. Return 0, or -1 (no /proc, or more groups than we read: do not guess). */
static int mix_files(uint64_t *h, struct kept_set *s)
{
    char buf[8192];
    ssize_t n = read_kept(s, KEPT_STATUS, buf, sizeof(buf));
    if (n <= 0 || (size_t)n == sizeof(buf))
        return -1;
    mix_status(h, buf, (size_t)n);
    n = read_kept(s, KEPT_OOM, buf, sizeof(buf));
    mix_long(h, n);
    if (n > 0)
        pg_fnv_mix(h, buf, (size_t)n);
    n = read_kept(s, KEPT_COREDUMP, buf, sizeof(buf));
    mix_long(h, n);
    if (n > 0)
        pg_fnv_mix(h, buf, (size_t)n);
    n = read_kept(s, KEPT_CGROUP, buf, sizeof(buf));
    if (n <= 0 || (size_t)n == sizeof(buf))
        return -1;
    pg_fnv_mix(h, buf, (size_t)n);
    return 0;
}

/* The fingerprint, with the /proc files of s. Return 0, or -1. */
static int fingerprint_with(struct kept_set *s, uint64_t *fp)
{
    uint64_t h = PG_FNV_OFFSET;
    char user_ns[sizeof(s->user_ns)];
    pid_t self = getpid();

    if (s->pid != self) {
        /* opened by another process: a child of a raw clone (past our fork handler) holds
         * copies of its parent's files */
        close_kept_set(s);
        s->pid = self;
    }
    pg_fnv_mix(&h, &self, sizeof(self));
    if (mix_namespaces(&h, s, user_ns, sizeof(user_ns)) < 0)
        return -1;
    reopen_if_user_ns_moved(s, user_ns);
    if (mix_files(&h, s) < 0 || mix_dir(&h, "/") < 0)
        return -1;
    mix_scheduling(&h);
    mix_limits(&h);
    *fp = h;
    return 0;
}

int pg_fingerprint(uint64_t *fp)
{
    struct kept_set scratch, *s = begin_kept_files(&scratch);
    int rc = fingerprint_with(s, fp);
    end_kept_files(s, &scratch);
    return rc;
}

/* ---------------------------------------------------------------- Python functions */

const char pg_fingerprint_doc[] =
    "_fingerprint() -> int | None\n\nPrivate, for tests and benchmarks: the calling thread's "
    "inherited-state fingerprint now (None: it could not be read).";

PyObject *pg_fingerprint_py(PyObject *module, PyObject *unused)
{
    uint64_t fp;
    int rc;
    (void)module;
    (void)unused;
    Py_BEGIN_ALLOW_THREADS
    rc = pg_fingerprint(&fp);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(fp);
}

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
 * forgets it (pthread_atfork): the idle shepherds are its parent's. Each entry holds its
 * shepherd's pidfd, so that letting it go waits for and signals that shepherd only, even if
 * code outside retest reaped it meanwhile and its pid is another child's now (child.c). The
 * fingerprint itself is fingerprint.c's.
 */
#define _GNU_SOURCE
#include "pool.h"
#include "fnv.h"
#include "protocol.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------- the pool */

struct idle {
    struct pg_shepherd sh;
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

/* Close our copies of the idle shepherds' socket and pidfd and empty the pool: they are
 * another process's (its parent still holds its own). A pidfd kept here could still signal
 * them. */
static void forget_pool(void)
{
    for (size_t i = 0; i < pool_len; i++) {
        close(pool[i].sh.ctl);
        pg_shepherd_close_pidfd(&pool[i].sh);
    }
    pool_len = 0;
}

/* In a forked child: the idle shepherds are the parent's; forget them and start empty.
 * Another thread may have held the lock at the fork: it is made anew. */
static void forget_after_fork(void)
{
    forget_pool();
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
    if (pool_len && pool_owner != getpid())
        forget_pool();
}

/* Take pool entry i out into *out (under pool_lock). */
static void remove_at(size_t i, struct idle *out)
{
    *out = pool[i];
    memmove(&pool[i], &pool[i + 1], (pool_len - i - 1) * sizeof(pool[0]));
    pool_len--;
}

int pg_pool_take(uint64_t fp, struct pg_shepherd *sh)
{
    struct idle e;
    int found = 0;
    lock_pool();
    for (size_t i = pool_len; i-- > 0 && !found;) {  /* the most recently used first */
        if (pool[i].fp == fp) {
            remove_at(i, &e);
            *sh = e.sh;
            found = 1;
        }
    }
    pthread_mutex_unlock(&pool_lock);
    return found;
}

uint64_t pg_path_key(const char *path)
{
    uint64_t h = PG_FNV_OFFSET;
    pg_fnv_mix(&h, path, strlen(path));
    return h ? h : 1;
}

/* Read one whole record from a pending shepherd's socket into *rec, waiting up to
 * PG_SETTLE_MS in all. Return 0, or -1 (EOF, an error, or no record in time). */
static int read_idle(int ctl, struct pg_record *rec)
{
    struct timespec t0, now;
    size_t got = 0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (got < sizeof(*rec)) {
        ssize_t n = recv(ctl, (char *)rec + got, sizeof(*rec) - got, MSG_DONTWAIT);
        long left_ms;
        struct pollfd p = {ctl, POLLIN, 0};
        if (n > 0) {
            got += (size_t)n;
            continue;
        }
        if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
            return -1;
        clock_gettime(CLOCK_MONOTONIC, &now);
        left_ms = PG_SETTLE_MS - ((now.tv_sec - t0.tv_sec) * 1000L +
                                  (now.tv_nsec - t0.tv_nsec) / 1000000L);
        if (left_ms <= 0)
            return -1;
        if (poll(&p, 1, (int)left_ms) < 0 && errno != EINTR)
            return -1;
    }
    return 0;
}

/* The keys of kept cgroups that their shepherd's IDLE said it let go (or that it could not
 * say), whoever read that IDLE: the caller's spares may still hold the path, and the run
 * that asks for it next must not get it (pg_pool_settle_cgroup). Under pool_lock. */
#define PG_DROPPED_MAX 256

static uint64_t dropped[PG_DROPPED_MAX];
static size_t dropped_next;

static void note_dropped(uint64_t key)
{
    lock_pool();
    dropped[dropped_next++ % PG_DROPPED_MAX] = key;
    pthread_mutex_unlock(&pool_lock);
}

/* Return 1 if key was noted as dropped, and forget it. */
static int take_dropped(uint64_t key)
{
    int found = 0;
    lock_pool();
    for (size_t i = 0; i < PG_DROPPED_MAX && !found; i++) {
        if (dropped[i] == key) {
            dropped[i] = 0;
            found = 1;
        }
    }
    pthread_mutex_unlock(&pool_lock);
    return found;
}

/* Settle sh: 0 with *kept (its cgroup is still kept), or -1 (it must be retired). */
static int settle(struct pg_shepherd *sh, int *kept)
{
    struct pg_record rec;
    int got;
    *kept = 0;
    if (!sh->pending)
        return 0;
    sh->pending = 0;
    got = read_idle(sh->ctl, &rec) == 0 && rec.kind == PG_REC_IDLE;
    *kept = got && rec.cgroup_kept != 0;
    if (sh->cg_key && !*kept)
        note_dropped(sh->cg_key);
    return got && rec.reusable ? 0 : -1;
}

int pg_shepherd_settle(struct pg_shepherd *sh)
{
    int kept;
    return settle(sh, &kept);
}

/* Take out an idle shepherd still pending with key. Return 1 with *out set, else 0. */
static int take_pending(uint64_t key, struct idle *out)
{
    int found = 0;
    lock_pool();
    for (size_t i = 0; i < pool_len && !found; i++) {
        if (pool[i].sh.pending && pool[i].sh.cg_key == key) {
            remove_at(i, out);
            found = 1;
        }
    }
    pthread_mutex_unlock(&pool_lock);
    return found;
}

int pg_pool_settle_cgroup(uint64_t key)
{
    struct idle e;
    while (take_pending(key, &e)) {
        int kept, ok = settle(&e.sh, &kept) == 0;
        if (!ok || !pg_pool_put(e.fp, &e.sh, PG_POOL_MAX))
            pg_pool_retire(&e.sh);
    }
    /* removed by its check, or unknown: not for this run (read here or by any other run) */
    return take_dropped(key) ? -1 : 0;
}

int pg_pool_evict(int keep, struct pg_shepherd *sh)
{
    int evicted = 0;
    lock_pool();
    if (keep < 0 || pool_len > (size_t)keep) {
        if (pool_len > 0) {  /* the least recently used: it may hold a state nobody asks for */
            struct idle e;
            remove_at(0, &e);
            *sh = e.sh;
            evicted = 1;
        }
    }
    pthread_mutex_unlock(&pool_lock);
    return evicted;
}

int pg_pool_put(uint64_t fp, const struct pg_shepherd *sh, int max_idle)
{
    int kept = 0;
    lock_pool();
    if (!pool_disabled && pool_len < (size_t)max_idle && pool_len < PG_POOL_MAX) {
        pool[pool_len].sh = *sh;
        pool[pool_len].fp = fp;
        pool_len++;
        pool_owner = getpid();
        kept = 1;
    }
    pthread_mutex_unlock(&pool_lock);
    return kept;
}

void pg_pool_retire(struct pg_shepherd *sh)
{
    struct timespec pause = {0, 50 * 1000};
    int got = 0, kept;
    /* One still checking the cgroup it kept finishes first: killed in the middle, it would
     * leave that cgroup unchecked for the next run. */
    if (sh->pending && sh->cg_key)
        settle(sh, &kept);
    /* An idle shepherd exits when its socket hangs up; shutdown, not only close: a forked
     * child of ours may hold a copy of it. */
    shutdown(sh->ctl, SHUT_RDWR);
    close(sh->ctl);
    sh->ctl = -1;
    for (int i = 0; i < 4000 && got == 0; i++) {  /* ~200 ms at most */
        got = pg_shepherd_wait(sh, WNOHANG, NULL);  /* -1: ECHILD, reaped by someone else */
        if (got == 0)
            nanosleep(&pause, NULL);
    }
    if (got == 0 && pg_shepherd_signal(sh, SIGKILL) == 0) {
        /* Still our unreaped child (the wait said so): stopped, or stuck. It has no child of
         * its own. A failed signal (ESRCH) means it was reaped meanwhile: nothing to wait. */
        pg_shepherd_wait(sh, 0, NULL);
    }
    pg_shepherd_close_pidfd(sh);
}

void pg_pool_give(uint64_t fp, const struct pg_shepherd *sh, int max_idle)
{
    struct pg_shepherd old, self = *sh;
    if (max_idle > PG_POOL_MAX)
        max_idle = PG_POOL_MAX;
    while (max_idle > 0 && pg_pool_evict(max_idle - 1, &old))
        pg_pool_retire(&old);
    if (max_idle <= 0 || !pg_pool_put(fp, &self, max_idle))
        pg_pool_retire(&self);
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
        pids[i] = pool[i].sh.pid;
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
    "reaped), and close the /proc files threads keep for the fingerprint; return how many "
    "shepherds (use retest.proc_group.close_shepherds).";

PyObject *pg_close_shepherds(PyObject *module, PyObject *unused)
{
    struct pg_shepherd sh;
    long count = 0;
    (void)module;
    (void)unused;
    Py_BEGIN_ALLOW_THREADS
    while (pg_pool_evict(-1, &sh)) {
        pg_pool_retire(&sh);
        count++;
    }
    pg_fingerprint_close_files();
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(count);
}

/* _retest_shepherd: the containment process of retest's native runner.
 *
 * The caller (run.c) starts this small static program with posix_spawn (a vfork-class
 * spawn, so its cost does not grow with the caller's memory) in a new session, with:
 *   fd 0, 1, 2  /dev/null
 *   fd 3        a socket to the caller: requests and command bytes come in, records go out
 *   argv        PG_SERVE_ARG (protocol.h)
 * Each run is a request on fd 3 (protocol.h: struct pg_request): the deadline (absolute, on
 * CLOCK_MONOTONIC, so the time to start the command counts against the caller's timeout),
 * the grace, the stop signal, the cwd, the run's cgroup, the command and its environment,
 * and the command's stdin, stdout and stderr as fds (SCM_RIGHTS). After the run, when
 * nothing of it is left, the shepherd says so in FINAL (reusable) and waits for the next
 * request (issue 15: the caller keeps a few idle shepherds, and a run then costs no second
 * process start); the caller hands a run only to a shepherd started from the same inherited
 * state as its own at the time of the call (run.c: the fingerprint).
 *
 * The shepherd makes itself a child subreaper, starts the command in a session of its
 * own, and stays its parent. Every process of the tree therefore ends up as one of our
 * descendants however it daemonizes: an orphan is re-parented to the nearest subreaper,
 * us. That gives two cheap facts the caller cannot get:
 *   - after the leader is reaped, "we have no children left" means "the tree is gone";
 *   - the live tree is exactly our descendants, found by walking /proc/<pid>/task/<tid>/children.
 * On the deadline, on a terminate request, when the caller goes away (even SIGKILLed:
 * the socket hangs up), or after the leader exits with something left behind, the whole
 * tree gets SIGTERM (or STOP_SIGNAL) + SIGCONT, then SIGKILL after the grace period, until
 * nothing is left.
 *
 * The shepherd itself is single-threaded, so fork()/vfork() here is cheap and safe. Nothing
 * of one run reaches the next: each run's state is reset, its fds are closed once the
 * command has them, and a shepherd with anything left of a run (a child it could not reap,
 * a cgroup it could not empty) is not reused: it exits after FINAL.
 *
 * Its default build has no libc (issue 15): nolibc.c supplies _start and the handful of
 * functions used here, on raw system calls, so a run pays no libc start-up (glibc's static
 * one costs ~0.6 ms on a VM). The code here is the same in every build and uses no stdio;
 * sanitizer builds (and RETEST_SHEPHERD_LIBC=glibc/musl) link it against a libc instead.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cgroup.h"
#include "fnv.h"
#include "pidfd.h"
#include "protocol.h"

#define NS_PER_S 1000000000LL
#define NS_PER_MS 1000000LL
/* After SIGKILL a process normally dies within microseconds; one stuck in an uninterruptible
 * sleep (D state, e.g. on a dead NFS server) may not. We give up waiting after this long so
 * the caller is never hung forever, and report how many were left. */
#define GIVE_UP_AFTER_KILL_NS (10 * NS_PER_S)

enum phase { RUNNING, TERMINATING, KILLING, DONE };

/* A run's cgroup as the shepherd holds it: open files (cg_files) and its directory as first
 * opened (cg_reusable compares). Kept across runs with the cgroup (PG_REQ_CG_KEEP), so a run
 * in a cgroup this shepherd used last reads it through open fds (issue 15). */
struct cg_cache {
    char *path;                 /* malloc'd: the cgroup these are of; NULL: none kept */
    int dfd, events;
    struct cg_files files;
    struct cg_made made;
};

struct state {
    pid_t self;
    pid_t leader;
    int leader_alive;
    int leader_status;
    int64_t deadline_ns;        /* -1: none */
    int64_t grace_ns;
    int stop_signal;            /* first signal of the stop sequence: SIGTERM unless told */
    int64_t phase_deadline_ns;  /* end of grace, or give-up bound while killing */
    enum phase phase;
    int caller_gone;
    int proc_checked;           /* proc_foreign below is known */
    int proc_foreign;           /* /proc shows another pid namespace: walk nothing (issue 10) */
    int no_pidfd;               /* pidfd_open is missing or refused: kill() by number */
    const char *cg_path;        /* the run's own cgroup (made by the caller), or NULL */
    int cg_required;            /* no fallback: fail the start if the command cannot go there */
    int cg_dfd;                 /* that cgroup's directory, -1 if none */
    int cg_events;              /* its cgroup.events, polled for POLLPRI, -1 if none */
    int in_cgroup;              /* the command runs in it: the tree is its members */
    int cg_empty;               /* the last read of cgroup.events said "populated 0" */
    int cg_killed;              /* cgroup.kill (or the freezer) was used on it: never reused */
    int saw_sigkill;            /* a process reaped in this run died of SIGKILL: maybe by a
                                 * cgroup.kill of the command's own, so the cgroup is not kept */
    int64_t cg_some0;           /* PG_REQ_CG_REUSED: its cpu.pressure some total at the start */
    struct cg_usage cg_base;    /* PG_REQ_CG_REUSED: cpu.stat before this run's command */
    struct cg_cache cg;         /* its open files and first stat; kept across runs */
    int children_left;          /* the last reap() left children of ours unreaped */
    int leaks_sent;
    struct pg_record final;
    /* this run's request (protocol.h: struct pg_request) */
    int req_flags;              /* PG_REQ_* */
    int stdio[4];               /* the command's stdin, stdout, stderr and (PG_REQ_CWD_FD) the
                                 * caller's cwd; -1 once closed, or not sent */
    char *payload;              /* the request's strings; what follows points into it */
    char **ptrs;                /* argv, NULL, envp, NULL */
    char *space;                /* where both live: kept across runs (request_space) */
    size_t space_len;
    const char *cwd;            /* NULL: the caller's, stdio[3] (else ours: run.c's fingerprint) */
    char **argv, **envp;
    uint64_t own0;              /* own_state() when we started: kept across runs */
    int pin_cpu;                /* this run's request: the caller pinned us to it, or -1 */
};

/* Return CLOCK_MONOTONIC in nanoseconds. */
static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NS_PER_S + ts.tv_nsec;
}

/* Send one record to the caller; a caller that went away is not an error. */
static void send_record(struct state *st, const struct pg_record *rec)
{
    const char *p = (const char *)rec;
    size_t left = sizeof(*rec);
    if (st->caller_gone)
        return;
    while (left > 0) {
        ssize_t n = send(PG_CONTROL_FD, p, left, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            st->caller_gone = 1;  /* EPIPE/ECONNRESET: nobody to tell */
            return;
        }
        p += n;
        left -= (size_t)n;
    }
}

/* Report a failure to start the command and exit; used before the command exists. A
 * shepherd that failed a start is not reused: the caller reaps it. */
static void fail_start(struct state *st, int stage, int err)
{
    struct pg_record rec;
    memset(&rec, 0, sizeof(rec));
    rec.kind = PG_REC_SPAWN_FAILED;
    rec.stage = stage;
    rec.err = err;
    send_record(st, &rec);
    memset(&rec, 0, sizeof(rec));
    rec.kind = PG_REC_FINAL;
    rec.wait_status = -1;
    send_record(st, &rec);
    _exit(0);
}

/* Build "<a><number><b>" into buf (size bytes, enough for any /proc path we make): the
 * shepherd uses no stdio, so that it links without a libc (nolibc.c). Return buf. */
static char *proc_path(char *buf, size_t size, const char *a, long number, const char *b)
{
    char digits[24];
    size_t n = 0, len = 0;
    unsigned long v = number < 0 ? 0 : (unsigned long)number;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v && n < sizeof(digits));
    for (const char *p = a; *p && len + 1 < size; p++)
        buf[len++] = *p;
    while (n > 0 && len + 1 < size)
        buf[len++] = digits[--n];
    for (const char *p = b; *p && len + 1 < size; p++)
        buf[len++] = *p;
    buf[len] = '\0';
    return buf;
}

/* Parse a decimal number at s after optional spaces into *out. Return the end, or NULL if
 * there is no number there. */
static const char *scan_long(const char *s, long *out)
{
    char *end;
    while (*s == ' ' || *s == '\t')
        s++;
    if ((*s < '0' || *s > '9') && *s != '-')
        return NULL;  /* strtol would skip a newline: a number must be on this line */
    *out = strtol(s, &end, 10);
    return end == s ? NULL : end;
}

/* ---------------------------------------------------------------- signal dispositions */

/* A kernel signal set, for rt_sigprocmask called directly: libc drops its reserved signals
 * (glibc 32 and 33, musl 32 to 34) from any mask it is given, and refuses to set them. */
struct ksigset {
    unsigned long w[(NSIG - 1 + 8 * sizeof(unsigned long) - 1) / (8 * sizeof(unsigned long))];
};

/* rt_sigprocmask(how, set) without libc's filtering. Async-signal-safe. Return 0 or -1. */
static int ksig_setmask(int how, const struct ksigset *set)
{
    return (int)syscall(SYS_rt_sigprocmask, how, set, NULL, sizeof(*set));
}

/* Reset sig to SIG_DFL with rt_sigaction called directly (libc refuses its reserved
 * signals). An all-zero kernel sigaction is SIG_DFL, no flags, empty mask, whatever the
 * architecture's field order. Async-signal-safe. Return 0 or -1. */
static int ksig_default(int sig)
{
    unsigned long zero[16] = {0};  /* larger than any architecture's kernel sigaction */
    return (int)syscall(SYS_rt_sigaction, sig, zero, NULL, sizeof(struct ksigset));
}

/* The signals posix_spawn cannot reset: libc reserves 32 to 34 (glibc 32 and 33, musl 32 to
 * 34), and its posix_spawn leaves them ignored in the child whatever POSIX_SPAWN_SETSIGDEF
 * asks. Every other signal reaches us SIG_DFL: run.c spawns us with SETSIGDEF over the full
 * set (protocol.h). */
#define LIBC_RESERVED_FIRST 32
#define LIBC_RESERVED_LAST 34

/* Make the shepherd deaf to every signal (issue 10: an orphan re-parented to us that signals
 * its new parent, X servers send SIGUSR1 when ready, anything may send SIGTSTP, must not kill
 * or stop us), with dispositions left SIG_DFL: the ones in read arrive through the signalfd,
 * the rest stay pending and are discarded with us. Blocking instead of ignoring (issue 15)
 * costs one call here and one in the child, where 64 sigaction calls each were made before:
 * exec keeps ignored signals ignored, so each had to be reset, but it keeps SIG_DFL as it is
 * and the child only has to clear the mask. SIGCHLD must stay SIG_DFL, never SIG_IGN: that
 * would auto-reap the tree and lose the leader's status. Return 0 or -1. */
static int shield_signals(void)
{
    struct ksigset all;
    for (int sig = LIBC_RESERVED_FIRST; sig <= LIBC_RESERVED_LAST; sig++)
        if (ksig_default(sig) < 0)
            return -1;
    memset(&all, 0xff, sizeof(all));  /* SIGKILL and SIGSTOP: the kernel drops them itself */
    return ksig_setmask(SIG_SETMASK, &all);
}

/* In the child before exec: no signal blocked. Every disposition is SIG_DFL already (see
 * shield_signals), which exec keeps. Async-signal-safe. Return 0, or -1 with errno. */
static int reset_signals_for_exec(void)
{
    struct ksigset none;
    memset(&none, 0, sizeof(none));
    return ksig_setmask(SIG_SETMASK, &none);
}

/* ---------------------------------------------------------------- finding the tree */

struct pidset {
    pid_t *pids;
    size_t len, cap;
};

/* Add pid unless present; return 0, or -1 when out of memory. */
static int pidset_add(struct pidset *s, pid_t pid)
{
    for (size_t i = 0; i < s->len; i++)
        if (s->pids[i] == pid)
            return 0;
    if (s->len == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        pid_t *p = realloc(s->pids, cap * sizeof(*p));
        if (!p)
            return -1;
        s->pids = p;
        s->cap = cap;
    }
    s->pids[s->len++] = pid;
    return 0;
}

/* Read a small /proc file into buf (NUL-terminated); return its length, or -1 with errno
 * from the failing call (close() must not clobber it: callers test for ENOENT). */
static ssize_t read_small(const char *path, char *buf, size_t size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC), saved;
    size_t got = 0;
    if (fd < 0)
        return -1;
    while (got + 1 < size) {
        ssize_t n = read(fd, buf + got, size - 1 - got);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            saved = errno;
            close(fd);
            errno = saved;
            return -1;
        }
        if (n == 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    buf[got] = '\0';
    return (ssize_t)got;
}

/* Parse a /proc children file into set, whatever its size: a process may have thousands of
 * children, and a number cut at a buffer boundary must never be taken for a pid (a cut
 * "1xxxx" would be pid 1, whose subtree is the whole machine). Return 0, or -1 with errno. */
static int add_children_file(const char *path, struct pidset *set)
{
    char buf[4096];
    long pid = 0;
    int in_number = 0, fd = open(path, O_RDONLY | O_CLOEXEC), saved;
    if (fd < 0)
        return -1;
    for (;;) {
        ssize_t n = read(fd, buf, sizeof(buf));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            saved = errno;
            close(fd);
            errno = saved;
            return -1;
        }
        /* a token ends at a separator or at EOF, never at a buffer boundary */
        for (ssize_t i = 0; i <= n; i++) {
            int at_eof = (n == 0 && i == 0);
            if (i == n && !at_eof)
                break;
            if (!at_eof && buf[i] >= '0' && buf[i] <= '9') {
                if (pid < (long)INT_MAX / 10)
                    pid = pid * 10 + (buf[i] - '0');
                in_number = 1;
                continue;
            }
            if (in_number && pid > 1)
                pidset_add(set, (pid_t)pid);
            pid = 0;
            in_number = 0;
        }
        if (n == 0)
            break;
    }
    close(fd);
    return 0;
}

/* Add the children of every thread of pid (from /proc/PID/task/TID/children) to set.
 * Return 0, or -1 if the kernel lacks the children file (CONFIG_PROC_CHILDREN). */
static int add_children(pid_t pid, struct pidset *set)
{
    char path[320];
    DIR *dir;
    struct dirent *de;
    int found_file = 0;

    dir = opendir(proc_path(path, sizeof(path), "/proc/", pid, "/task"));
    if (!dir)
        return 0;  /* already gone */
    while ((de = readdir(dir)) != NULL) {
        if (de->d_name[0] < '0' || de->d_name[0] > '9')
            continue;
        size_t len;
        proc_path(path, sizeof(path), "/proc/", pid, "/task/");
        len = strlen(path);
        if (len + strlen(de->d_name) + sizeof("/children") > sizeof(path))
            continue;  /* a thread id has at most 10 digits: never */
        memcpy(path + len, de->d_name, strlen(de->d_name));
        memcpy(path + len + strlen(de->d_name), "/children", sizeof("/children"));
        if (add_children_file(path, set) < 0) {
            if (errno != ENOENT && errno != ESRCH)
                found_file = 1;
            continue;
        }
        found_file = 1;
    }
    closedir(dir);
    return found_file ? 0 : -1;
}

/* Fallback without the children file: scan every /proc/PID/stat and keep the pids whose
 * parent chain leads to root. O(all processes), so used only where the fast path is absent. */
static void add_descendants_by_scan(pid_t root, struct pidset *set)
{
    DIR *dir = opendir("/proc");
    struct dirent *de;
    pid_t *pid = NULL, *ppid = NULL;
    size_t n = 0, cap = 0;
    int grew = 1;

    if (!dir)
        return;
    while ((de = readdir(dir)) != NULL) {
        char path[64], buf[512], *close_paren;
        long p, pp;
        if (de->d_name[0] < '1' || de->d_name[0] > '9')
            continue;
        p = strtol(de->d_name, NULL, 10);
        if (read_small(proc_path(path, sizeof(path), "/proc/", p, "/stat"), buf, sizeof(buf)) < 0)
            continue;
        close_paren = strrchr(buf, ')');  /* comm may contain spaces and parens */
        /* ") S 1234": the state, then the parent's pid */
        if (!close_paren || close_paren[1] != ' ' || !close_paren[2] ||
            !scan_long(close_paren + 3, &pp))
            continue;
        if (n == cap) {
            size_t ncap = cap ? cap * 2 : 256;
            pid_t *a = realloc(pid, ncap * sizeof(*a)), *b;
            if (!a)
                break;
            pid = a;
            b = realloc(ppid, ncap * sizeof(*b));
            if (!b)
                break;
            ppid = b;
            cap = ncap;
        }
        pid[n] = (pid_t)p;
        ppid[n] = (pid_t)pp;
        n++;
    }
    closedir(dir);
    if (pidset_add(set, root) < 0 || set->len == 0) {
        free(pid);
        free(ppid);
        return;
    }
    while (grew) {  /* transitive closure; trees are shallow, so few passes */
        grew = 0;
        for (size_t i = 0; i < n; i++) {
            size_t before = set->len;
            for (size_t j = 0; j < set->len; j++)
                if (set->pids[j] == ppid[i]) {
                    pidset_add(set, pid[i]);
                    break;
                }
            if (set->len != before)
                grew = 1;
        }
    }
    /* drop root itself: it sits first */
    memmove(set->pids, set->pids + 1, (set->len - 1) * sizeof(pid_t));
    set->len--;
    free(pid);
    free(ppid);
}

/* Return 1 if /proc belongs to our pid namespace, 0 if it shows another one (a run under
 * `unshare --pid --fork` without a new /proc) or none. In a foreign /proc, /proc/<our pid> is
 * somebody else: its "children" are bystanders, and killing those numbers in our namespace
 * hits innocent processes (issue 10). NSpid lists one pid per namespace from the one /proc
 * belongs to down to ours, so exactly one entry, equal to getpid(), proves it is ours;
 * kernels before 4.1 lack NSpid, where the /proc/self link is compared instead. */
static int proc_is_ours(pid_t self)
{
    char buf[4096], *line;
    long first, second;
    ssize_t n = read_small("/proc/self/status", buf, sizeof(buf));
    if (n < 0)
        return 0;  /* no /proc, or we are not in it at all */
    line = strstr(buf, "\nNSpid:");
    if (line) {
        const char *rest = scan_long(line + 7, &first);
        /* exactly one entry: a second number on the line means a nested namespace */
        return rest && !scan_long(rest, &second) && first == self;
    }
    n = readlink("/proc/self", buf, sizeof(buf) - 1);
    if (n < 0)
        return 0;
    buf[n] = '\0';
    return strtol(buf, NULL, 10) == self;
}

/* Return 1 if the tree may be found through /proc; decide (and report) it once per run. */
static int proc_walkable(struct state *st)
{
    if (!st->proc_checked) {
        st->proc_foreign = !proc_is_ours(st->self);
        st->proc_checked = 1;
        /* in cgroup mode nothing depends on /proc: the run is not degraded */
        st->final.proc_foreign = st->proc_foreign && !st->in_cgroup;
    }
    return !st->proc_foreign;
}

/* Collect every descendant of the shepherd, parents before their children; nothing when
 * /proc is not ours (then only the leader's group is reachable, see signal_tree). */
static void collect_tree(struct state *st, struct pidset *set)
{
    set->len = 0;
    if (!proc_walkable(st))
        return;
    if (add_children(st->self, set) < 0) {
        add_descendants_by_scan(st->self, set);
        return;
    }
    /* breadth-first: set grows while we walk it */
    for (size_t i = 0; i < set->len; i++)
        add_children(set->pids[i], set);
}

/* What /proc/PID/stat says about a process. */
struct proc_stat {
    char state;
    pid_t ppid;
    long threads;
};

/* Read /proc/PID/stat into ps. Return 0, or -1 if the process is gone or unreadable. */
static int read_proc_stat(pid_t pid, struct proc_stat *ps)
{
    char path[64], buf[1024], *p;
    long ppid;
    if (read_small(proc_path(path, sizeof(path), "/proc/", pid, "/stat"), buf, sizeof(buf)) < 0)
        return -1;
    p = strrchr(buf, ')');  /* comm may contain spaces and parens: ") S 1234 ..." */
    if (!p || p[1] != ' ' || !p[2] || !scan_long(p + 3, &ppid))
        return -1;
    ps->state = p[2];
    ps->ppid = (pid_t)ppid;
    /* num_threads is field 20; p is on the ')' that ends field 2, and each space found
     * starts the next field */
    for (int field = 2; field < 20 && p; field++)
        p = strchr(p + 1, ' ');
    ps->threads = p ? strtol(p + 1, NULL, 10) : 1;
    return 0;
}

/* Return how long pid has been running, in microseconds (its start time in /proc/PID/stat,
 * field 22, against CLOCK_BOOTTIME, both since boot), or -1 if unknown. */
static int64_t process_age_us(pid_t pid)
{
    char path[64], buf[1024], *p;
    long start_ticks;
    long hz = sysconf(_SC_CLK_TCK);
    struct timespec boot;
    if (hz <= 0 || read_small(proc_path(path, sizeof(path), "/proc/", pid, "/stat"), buf,
                              sizeof(buf)) < 0 || !(p = strrchr(buf, ')')))
        return -1;
    for (int field = 2; field < 22 && p; field++)  /* as in read_proc_stat: p ends field 2 */
        p = strchr(p + 1, ' ');
    if (!p || !scan_long(p + 1, &start_ticks) || start_ticks < 0 ||
        clock_gettime(CLOCK_BOOTTIME, &boot) < 0)
        return -1;
    return ((int64_t)boot.tv_sec * 1000000 + boot.tv_nsec / 1000) -
           (int64_t)((unsigned long long)start_ticks * 1000000ULL / (unsigned long long)hz);
}

/* Return 1 if ps describes a dead process that only waits to be reaped. A thread group
 * whose leader thread called pthread_exit reads Z as well while its other threads run on:
 * that one is alive, must be signalled, and is not "gone" (issue 10). */
static int proc_is_dead(const struct proc_stat *ps)
{
    return (ps->state == 'Z' || ps->state == 'X') && ps->threads <= 1;
}

/* Open a pidfd for pid. Return it, or -1: *gone is set when the process no longer exists;
 * otherwise pidfds are unavailable (ENOSYS, a seccomp EPERM: remembered) or this one could
 * not be had (EMFILE), and the caller falls back to kill() by number. */
static int open_pidfd(struct state *st, pid_t pid, int *gone)
{
    int fd;
    *gone = 0;
#ifdef SYS_pidfd_open
    if (st->no_pidfd)
        return -1;
    fd = (int)syscall(SYS_pidfd_open, pid, 0);  /* always close-on-exec */
    if (fd >= 0)
        return fd;
    if (errno == ESRCH)
        *gone = 1;
    else if (errno == ENOSYS || errno == EPERM)
        st->no_pidfd = 1;
#else
    (void)st;
    (void)pid;
    (void)fd;
#endif
    return -1;
}

/* Return 1 if the process behind pidfd fd has exited (its pid may belong to a stranger
 * now); 0 if it lives, or if fd is -1 (nothing is known). */
static int pidfd_exited(int fd)
{
    struct pollfd pfd = {fd, POLLIN, 0};
    int n;
    if (fd < 0)
        return 0;
    do {
        n = poll(&pfd, 1, 0);
    } while (n < 0 && errno == EINTR);
    return n > 0;  /* a pidfd polls readable once its process has exited */
}

/* Index of pid among the first n pids, or -1. */
static long index_of(const pid_t *pids, size_t n, pid_t pid)
{
    for (size_t i = 0; i < n; i++)
        if (pids[i] == pid)
            return (long)i;
    return -1;
}

enum membership { NOT_OURS, GONE, LIVE };

/* Decide whether pid (pidfd fd, or -1) is a live process of our tree: its parent must be
 * the shepherd or one of the n members already accepted (pids[], their pidfds fds[]). A pid
 * can be reused between the walk and now; with pidfds the check is exact: a process that is
 * still alive after /proc was read holds its pid, so the read described it, and a parent
 * still alive then was really its parent. */
static enum membership check_member(const struct state *st, const pid_t *pids, const int *fds,
                                    size_t n, pid_t pid, int fd)
{
    struct proc_stat ps;
    long parent;
    if (read_proc_stat(pid, &ps) < 0)
        return GONE;
    parent = ps.ppid == st->self ? -2 : index_of(pids, n, ps.ppid);
    if (parent == -1)
        return NOT_OURS;
    if (parent >= 0 && fds && pidfd_exited(fds[parent])) {
        /* The parent died since the walk: its children were re-parented (to us, or to a
         * subreaper of the tree) before its pid was freed, so a fresh read tells. */
        if (read_proc_stat(pid, &ps) < 0)
            return GONE;
        if (ps.ppid != st->self && index_of(pids, n, ps.ppid) < 0)
            return NOT_OURS;
    }
    if (pidfd_exited(fd))
        return GONE;
    return proc_is_dead(&ps) ? GONE : LIVE;
}

/* Send sig to one process: through its pidfd when there is one (exact), else by number. */
static void send_to(struct state *st, pid_t pid, int fd, int sig)
{
#ifdef SYS_pidfd_send_signal
    if (fd >= 0 && !st->no_pidfd) {
        if (syscall(SYS_pidfd_send_signal, fd, sig, NULL, 0) == 0 || errno != ENOSYS)
            return;  /* sent, or ESRCH: it exited since */
        st->no_pidfd = 1;
    }
#else
    (void)st;
    (void)fd;
#endif
    kill(pid, sig);
}

/* Walk the tree and keep its verified live members at the front of set (in walk order),
 * with their pidfds in *fds (NULL: by number). Return how many were kept. */
static size_t collect_walked(struct state *st, struct pidset *set, int **fds)
{
    pid_t caller = getppid();
    size_t hit = 0;

    collect_tree(st, set);
    *fds = set->len ? malloc(set->len * sizeof(int)) : NULL;  /* NULL: by number this pass */
    for (size_t i = 0; i < set->len; i++) {
        pid_t pid = set->pids[i];
        int gone = 0, fd = -1;
        /* belt and braces: whatever /proc said, these are never ours to kill */
        if (pid <= 1 || pid == st->self || pid == caller)
            continue;
        if (*fds && (fd = open_pidfd(st, pid, &gone)) < 0 && gone)
            continue;
        if (check_member(st, set->pids, *fds, hit, pid, fd) != LIVE) {
            if (fd >= 0)
                close(fd);
            continue;
        }
        set->pids[hit] = pid;  /* accepted members move to the front, in walk order */
        if (*fds)
            (*fds)[hit] = fd;
        hit++;
    }
    return hit;
}

/* Read cgroup.procs of the run's cgroup into set, whatever its size. Return 0 or -1. */
static int read_cgroup_members(const struct state *st, struct pidset *set)
{
    for (;;) {
        long n = cg_read_procs(st->cg_dfd, set->pids, (long)set->cap);
        if (n < 0)
            return -1;
        if ((size_t)n <= set->cap) {
            set->len = (size_t)n;
            return 0;
        }
        pid_t *p = realloc(set->pids, (size_t)n * 2 * sizeof(*p));
        if (!p)
            return -1;
        set->pids = p;
        set->cap = (size_t)n * 2;
    }
}

/* cgroup mode: keep the live members of the run's cgroup at the front of set, with their
 * pidfds in *fds. A pid read from cgroup.procs may be reused before we hold it, so: read,
 * take pidfds, read again; a pid in both reads whose pidfd is still alive after the second
 * read was, during that read, the member with that pid (a live process holds its pid), so
 * the pidfd is that member. The check needs no /proc: it also holds under a foreign /proc.
 * Return how many were kept. */
static size_t collect_cgroup(struct state *st, struct pidset *set, int **fds)
{
    struct pidset again = {0};
    size_t hit = 0;

    *fds = NULL;
    if (read_cgroup_members(st, set) < 0 || set->len == 0)
        return 0;
    *fds = malloc(set->len * sizeof(int));  /* NULL: by number this pass */
    for (size_t i = 0; *fds && i < set->len; i++) {
        int gone;
        (*fds)[i] = open_pidfd(st, set->pids[i], &gone);
        if (gone)
            (*fds)[i] = -2;  /* exited between the read and pidfd_open */
    }
    if (read_cgroup_members(st, &again) < 0) {
        again.len = 0;  /* cannot confirm: signal by the first read only, as without pidfds */
        for (size_t i = 0; i < set->len; i++)
            pidset_add(&again, set->pids[i]);
    }
    for (size_t i = 0; i < set->len; i++) {
        int fd = *fds ? (*fds)[i] : -1;
        if (fd == -2 || index_of(again.pids, again.len, set->pids[i]) < 0 || pidfd_exited(fd)) {
            if (fd >= 0)
                close(fd);
            continue;
        }
        set->pids[hit] = set->pids[i];
        if (*fds)
            (*fds)[hit] = fd;
        hit++;
    }
    free(again.pids);
    return hit;
}

/* Name up to PG_MAX_LEAKS of the n processes in pids (left after the command exited) to the
 * caller: pid, age, command line head. Under a foreign /proc only the pid is known. */
static void report_leaks(struct state *st, const pid_t *pids, size_t n)
{
    for (size_t i = 0; i < n && st->leaks_sent < PG_MAX_LEAKS; i++, st->leaks_sent++) {
        struct pg_record rec;
        char path[64];
        ssize_t len;
        memset(&rec, 0, sizeof(rec));
        rec.kind = PG_REC_LEAK;
        rec.pid = pids[i];
        rec.age_us = -1;
        if (proc_walkable(st)) {
            char text[PG_LEAK_TEXT + 1];
            len = read_small(proc_path(path, sizeof(path), "/proc/", pids[i], "/cmdline"), text,
                             sizeof(text));
            for (ssize_t j = 0; j < len; j++)
                if (text[j] == '\0')
                    text[j] = ' ';
            while (len > 0 && text[len - 1] == ' ')
                len--;
            if (len > 0) {
                memcpy(rec.text, text, (size_t)len);
                rec.text_len = (int32_t)len;
            }
            rec.age_us = process_age_us(pids[i]);
        }
        send_record(st, &rec);
    }
}

/* Send sig (and SIGCONT after it unless it is SIGKILL or SIGCONT: a stopped process does not
 * act on SIGTERM or most others, as GNU timeout reasons) to every live process of the tree and
 * to the leader's group; sig 0 only counts. With leaks set, the
 * processes found are named to the caller first. Return how many live processes there were.
 * This is the one "signal the whole tree" step; the tree is the run's cgroup in cgroup mode,
 * the shepherd's descendants otherwise. */
static int signal_tree(struct state *st, int sig, int leaks)
{
    struct pidset set = {0};
    int *fds;
    size_t hit;

    /* Walk, check, then signal: counting after the group kill would miss the fast dyers. */
    hit = st->in_cgroup ? collect_cgroup(st, &set, &fds) : collect_walked(st, &set, &fds);
    if (leaks) {
        report_leaks(st, set.pids, hit);
        st->final.leak_count += (int32_t)hit;
    }
    /* The group catches members forked after the walk, but only while the leader is
     * unreaped: after that its pid, and so the group id, may be reused by a stranger. The walk
     * covers any member left. It is all that is reachable when /proc is not ours. */
    if (st->leader_alive && sig != 0) {
        kill(-st->leader, sig);
        if (sig != SIGKILL && sig != SIGCONT)
            kill(-st->leader, SIGCONT);
    }
    for (size_t i = 0; i < hit; i++) {
        int fd = fds ? fds[i] : -1;
        if (sig != 0) {
            send_to(st, set.pids[i], fd, sig);
            if (sig != SIGKILL && sig != SIGCONT)
                send_to(st, set.pids[i], fd, SIGCONT);
        }
        if (fd >= 0)
            close(fd);
    }
    free(fds);
    free(set.pids);
    if (st->proc_foreign && !st->in_cgroup)
        return st->leader_alive;  /* we cannot count what we cannot see: the group, as one */
    return (int)hit;
}

/* Return 1 if anything of the tree can still be reached: with a foreign /proc, only the
 * leader's group while the leader is unreaped. */
static int tree_reachable(const struct state *st)
{
    return st->in_cgroup || !st->proc_foreign || st->leader_alive;
}

/* Add one reaped process's rusage (its own and its reaped descendants') to the run's: the
 * sum over every process we reap is what RUSAGE_CHILDREN would say for a shepherd that
 * served one run, and maxrss is the largest (getrusage's would carry over between runs). */
static void add_rusage(struct state *st, const struct rusage *ru)
{
    st->final.utime_us += (int64_t)ru->ru_utime.tv_sec * 1000000 + ru->ru_utime.tv_usec;
    st->final.stime_us += (int64_t)ru->ru_stime.tv_sec * 1000000 + ru->ru_stime.tv_usec;
    if (ru->ru_maxrss > st->final.maxrss_kb)
        st->final.maxrss_kb = ru->ru_maxrss;
}

/* Reap every child that has exited; record the leader's status. Return 1 if children remain. */
static int reap(struct state *st)
{
    for (;;) {
        int status;
        struct rusage ru;
        pid_t pid = wait4(-1, &status, WNOHANG | __WALL, &ru);
        if (pid > 0) {
            add_rusage(st, &ru);
            if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
                st->saw_sigkill = 1;
            if (pid == st->leader) {
                st->leader_alive = 0;
                st->leader_status = status;
            }
            continue;
        }
        if (pid == 0)
            return 1;
        if (errno == EINTR)
            continue;
        return 0;  /* ECHILD: nothing left of the tree */
    }
}

/* ---------------------------------------------------------------- our own state */

/* Read our own /proc file path into buf through *fd, opened at the first call and kept (a
 * pread at offset 0 reads it anew: ~1-2 us, where open, read and close cost ~10-25, which
 * own_state paid four times before every FINAL). Return its length, or -1. */
static ssize_t pread_small(int *fd, const char *path, char *buf, size_t size)
{
    size_t got = 0;
    if (*fd < 0 && (*fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
        return -1;
    while (got + 1 < size) {
        size_t room = size - 1 - got;
        ssize_t n = pread(*fd, buf + got, room, (off_t)got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        got += (size_t)n;
        if ((size_t)n < room)  /* short of the room: the end (a /proc file's text is made whole) */
            break;
    }
    buf[got] = '\0';
    return (ssize_t)got;
}

/* Mix a small /proc file of ours (its length, or -1, too). */
static void own_mix_file(uint64_t *h, int *fd, const char *path)
{
    char buf[2048];
    ssize_t n = pread_small(fd, path, buf, sizeof(buf));
    pg_fnv_mix(h, &n, sizeof(n));
    if (n > 0)
        pg_fnv_mix(h, buf, (size_t)n);
}

/* Hash what another process of the same user may change in us and what our commands would
 * inherit: nice and scheduling, affinity, I/O priority, rlimits, oom_score_adj, cgroups,
 * core dump filter, timer slack. A command can renice, prlimit or move its parent: a
 * shepherd changed so is not reused (the caller's fingerprint described it as started). */
static uint64_t own_state(void)
{
    static int own_fds[4] = {-1, -1, -1, -1};  /* our own /proc files: this process's, for life */
    uint64_t h = PG_FNV_OFFSET;
    unsigned char attr[56];
    unsigned long cpus[16];
    long v;

    memset(attr, 0, sizeof(attr));
    v = syscall(SYS_sched_getattr, 0, attr, sizeof(attr), 0);
    pg_fnv_mix(&h, &v, sizeof(v));
    pg_fnv_mix(&h, attr, sizeof(attr));
    v = syscall(SYS_getpriority, PRIO_PROCESS, 0);
    pg_fnv_mix(&h, &v, sizeof(v));
    memset(cpus, 0, sizeof(cpus));
    v = syscall(SYS_sched_getaffinity, 0, sizeof(cpus), cpus);
    pg_fnv_mix(&h, &v, sizeof(v));
    pg_fnv_mix(&h, cpus, sizeof(cpus));
    v = syscall(SYS_ioprio_get, 1 /* IOPRIO_WHO_PROCESS */, 0);
    pg_fnv_mix(&h, &v, sizeof(v));
    for (int r = 0; r < RLIM_NLIMITS; r++) {
        uint64_t lim[2] = {0, 0};
        v = syscall(SYS_prlimit64, 0, r, NULL, lim);
        pg_fnv_mix(&h, &v, sizeof(v));
        pg_fnv_mix(&h, lim, sizeof(lim));
    }
    own_mix_file(&h, &own_fds[0], "/proc/self/oom_score_adj");
    own_mix_file(&h, &own_fds[1], "/proc/self/cgroup");
    own_mix_file(&h, &own_fds[2], "/proc/self/coredump_filter");
    own_mix_file(&h, &own_fds[3], "/proc/self/timerslack_ns");
    return h;
}

/* ---------------------------------------------------------------- starting the command */

/* Close every fd above the control socket: the caller's inheritable fds (a lock file, a
 * pipe some library made inheritable) must not reach the command, as with subprocess's
 * close_fds=True. close_range (Linux 5.9) in one call; a /proc/self/fd walk otherwise. */
static void close_inherited_fds(void)
{
    DIR *dir;
    struct dirent *de;
#ifdef SYS_close_range
    if (syscall(SYS_close_range, PG_CONTROL_FD + 1, ~0U, 0) == 0)
        return;
#endif
    dir = opendir("/proc/self/fd");
    if (!dir) {
        for (int fd = PG_CONTROL_FD + 1; fd < 1024; fd++)
            close(fd);
        return;
    }
    while ((de = readdir(dir)) != NULL) {
        int fd = (int)strtol(de->d_name, NULL, 10);
        if (fd > PG_CONTROL_FD && fd != dirfd(dir))
            close(fd);
    }
    closedir(dir);
}

/* Return the value of name in envp (a NULL-terminated "NAME=value" list), or NULL. */
static const char *env_get(char **envp, const char *name)
{
    size_t len = strlen(name);
    for (char **e = envp; *e; e++)
        if (strncmp(*e, name, len) == 0 && (*e)[len] == '=')
            return *e + len + 1;
    return NULL;
}

/* Build the list of paths to try for cmd (a name without '/'), as execvp would, from the
 * command's own PATH. Done before vfork: the child must not allocate. */
static __attribute__((noinline)) char **exec_candidates(const char *cmd, char **envp)
{
    const char *path, *p;
    size_t count = 1, cmdlen = strlen(cmd);
    char **list;
    size_t i = 0;

    path = env_get(envp, "PATH");
    if (!path)
        path = "/bin:/usr/bin";  /* os.defpath */
    for (p = path; *p; p++)
        count += (*p == ':');
    list = calloc(count + 1, sizeof(char *));
    if (!list)
        return NULL;
    for (p = path;;) {
        const char *colon = strchr(p, ':');
        size_t dirlen = colon ? (size_t)(colon - p) : strlen(p);
        char *full = malloc(dirlen + cmdlen + 3);
        if (!full)
            return NULL;
        if (dirlen == 0) {  /* empty PATH entry: current directory */
            memcpy(full, "./", 2);
            dirlen = 2;
        } else {
            memcpy(full, p, dirlen);
            full[dirlen++] = '/';
        }
        memcpy(full + dirlen, cmd, cmdlen + 1);
        list[i++] = full;
        if (!colon)
            break;
        p = colon + 1;
    }
    return list;
}

struct child_failure {
    int32_t stage;
    int32_t err;
};

/* What the child needs between vfork (or clone3) and exec, made before it starts. */
struct child_args {
    pid_t self;             /* the shepherd: the child checks it is still its parent */
    int err_fd;             /* close-on-exec pipe for a struct child_failure */
    int procs_fd;           /* vfork fallback of cgroup mode: the cgroup's cgroup.procs, or -1 */
    const int *stdio;       /* the command's stdin, stdout, stderr (all > 2: ours are /dev/null),
                             * and the caller's cwd or -1 */
    const char *cwd;
    char **candidates, **argv, **envp;
    int pin_cpu;            /* the request's: the CPU the caller pinned us to, or -1 */
};

/* The CPU mask we were started with: the caller's (its fingerprint says so), which each command
 * inherits. A caller pins a shepherd it hands a run to onto its own CPU (run.c, child.c:
 * pg_shepherd_pin); the command gets this mask back (restore_start_cpus) and so do we, after
 * the run (send_idle). Read from /proc/self/status's Cpus_allowed, the whole mask, where
 * sched_getaffinity leaves out the CPUs offline now (a command restored without them would
 * never use one brought online later). 8192 CPUs: CONFIG_NR_CPUS's bound. start_cpus_len 0:
 * not read (such a shepherd serves one run, never pinned). */
#define PG_CPU_WORDS (8192 / (8 * sizeof(unsigned long)))
static unsigned long start_cpus[PG_CPU_WORDS];
static size_t start_cpus_len;

/* The value of a hex digit, or -1. */
static int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* Parse a cpumask as the kernel prints it ("ff,ffffffff": 32-bit groups, the highest first)
 * from s up to the line's end into mask (words, the lowest first). Return the bytes of mask
 * it covers, or 0 if it is not such a mask or is wider than mask. */
static size_t parse_cpumask(const char *s, unsigned long *mask, size_t words)
{
    const size_t word_bits = 8 * sizeof(unsigned long);
    size_t digits = 0, bit = 0;
    const char *end = s;
    while (hex_digit(*end) >= 0 || *end == ',')
        digits += *end++ != ',';
    if (digits == 0 || *end != '\n' || digits * 4 > words * word_bits)
        return 0;
    memset(mask, 0, words * sizeof(unsigned long));
    for (const char *p = end - 1; p >= s; p--) {  /* the lowest digit first */
        int v = hex_digit(*p);
        if (v < 0)
            continue;  /* a group's comma */
        mask[bit / word_bits] |= (unsigned long)v << (bit % word_bits);
        bit += 4;
    }
    return (bit + word_bits - 1) / word_bits * sizeof(unsigned long);
}

/* Our whole CPU mask into start_cpus: Cpus_allowed, else sched_getaffinity's. */
static void read_start_cpus(void)
{
    static const char key[] = "\nCpus_allowed:\t";
    char buf[4096];
    ssize_t n = read_small("/proc/self/status", buf, sizeof(buf));
    const char *at = n > 0 ? strstr(buf, key) : NULL;
    long got;
    if (at && (start_cpus_len = parse_cpumask(at + sizeof(key) - 1, start_cpus, PG_CPU_WORDS)))
        return;
    got = syscall(SYS_sched_getaffinity, 0, sizeof(start_cpus), start_cpus);
    start_cpus_len = got > 0 ? (size_t)got : 0;
}

/* Is mask (len bytes, as sched_getaffinity filled it) exactly {cpu}? Async-signal-safe. */
static int only_cpu(const unsigned long *mask, size_t len, int cpu)
{
    size_t bits = 8 * sizeof(unsigned long), word = (size_t)cpu / bits;
    for (size_t i = 0; i < len / sizeof(unsigned long); i++)
        if (mask[i] != (i == word ? 1UL << ((size_t)cpu % bits) : 0UL))
            return 0;
    return word < len / sizeof(unsigned long);
}

/* In the child of a pinned run: the start mask back, so that the command has the mask it
 * would have inherited unpinned. Only if the child still has the one CPU we were pinned to:
 * a cgroup of its own with a cpuset (its placement sets the cpuset's CPUs) is left as the
 * kernel made it, as it would be unpinned. Async-signal-safe. Return 0 or -1 with errno. */
static int restore_start_cpus(int pin_cpu)
{
    unsigned long now[PG_CPU_WORDS];
    long n;
    if (pin_cpu < 0)
        return 0;
    n = syscall(SYS_sched_getaffinity, 0, sizeof(now), now);
    if (n < 0)
        return -1;
    if (!only_cpu(now, (size_t)n, pin_cpu))
        return 0;
    return syscall(SYS_sched_setaffinity, 0, start_cpus_len, start_cpus) < 0 ? -1 : 0;
}

/* Give the child its stdin, stdout and stderr. The received fds are close-on-exec; the
 * copies dup2 makes are not. Async-signal-safe. Return 0, or -1 with errno. */
static int install_stdio(const int *stdio)
{
    for (int i = 0; i < 3; i++)
        if (dup2(stdio[i], i) < 0)
            return -1;
    return 0;
}

/* The child between vfork (or clone3) and exec. Only async-signal-safe calls: no
 * allocation, no stdio, no locks; the parent is suspended until we exec or _exit, and we
 * share its memory, so nothing here may modify memory the parent relies on besides the
 * failure report. */
static void child_exec(const struct child_args *a)
{
    struct child_failure f = {0, 0};

    /* vfork fallback of cgroup mode: move ourselves into the run's cgroup before anything of
     * the command runs (a raw write() is async-signal-safe); clone3 placed us at birth. */
    if (a->procs_fd >= 0 && write(a->procs_fd, "0", 1) != 1) {
        f.stage = PG_STAGE_CGROUP;
        f.err = errno;
        goto fail;
    }
    if (setsid() < 0) {
        f.stage = PG_STAGE_SETSID;
        f.err = errno;
        goto fail;
    }
    /* If the shepherd itself dies (SIGKILL), the leader goes with it; if it died already,
     * between vfork and here, we were re-parented and must not start at all. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0) {
        f.stage = PG_STAGE_SHEPHERD;
        f.err = errno;
        goto fail;
    }
    if (getppid() != a->self) {
        f.stage = PG_STAGE_SHEPHERD;
        f.err = ESRCH;
        goto fail;
    }
    if ((a->cwd && chdir(a->cwd) < 0) || (!a->cwd && a->stdio[3] >= 0 && fchdir(a->stdio[3]) < 0)) {
        f.stage = PG_STAGE_CHDIR;
        f.err = errno;
        goto fail;
    }
    if (install_stdio(a->stdio) < 0 || reset_signals_for_exec() < 0 ||
        restore_start_cpus(a->pin_cpu) < 0) {
        f.stage = PG_STAGE_SHEPHERD;
        f.err = errno;
        goto fail;
    }
    f.stage = PG_STAGE_EXEC;
    f.err = ENOENT;
    if (a->argv[0][0] == '\0')
        goto fail;  /* "" names no program (a PATH search would find directories) */
    f.err = 0;
    for (char **c = a->candidates; *c; c++) {
        execve(*c, a->argv, a->envp);
        /* As CPython's _posixsubprocess (the subprocess backend): try every candidate, and
         * report the first error that is not "no such file here" (issue 10). */
        if (errno != ENOENT && errno != ENOTDIR && f.err == 0)
            f.err = errno;
    }
    if (f.err == 0)
        f.err = ENOENT;
fail:
    while (write(a->err_fd, &f, sizeof(f)) < 0 && errno == EINTR)
        ;
    _exit(127);
}

/* vfork and exec in the child; return the child's pid or -1. Kept apart so that no local
 * of the caller lives across vfork (the child shares our stack frame until it execs). */
static __attribute__((noinline)) pid_t vfork_exec(const struct child_args *a)
{
    pid_t pid = vfork();
    if (pid == 0)
        child_exec(a);
    return pid;
}

/* clone3 (Linux 5.7 for CLONE_INTO_CGROUP); old headers, and musl's, lack the names. */
#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#define PG_CLONE_INTO_CGROUP 0x200000000ULL
struct pg_clone_args {  /* struct clone_args, CLONE_ARGS_SIZE_VER2 */
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
        set_tid, set_tid_size, cgroup;
};

/* The no-libc build's clone3 trampoline (nolibc.c, x86_64 only). Weak: aarch64 and the libc
 * builds lack it, see NULL here, and use the fork-like clone3 below. */
extern long nolibc_clone3_run(void *args, size_t size, void (*fn)(void *), void *arg)
    __attribute__((weak));

/* The trampoline's child: child_exec on its own stack. Never returns. */
static void clone_child(void *p)
{
    child_exec(p);
}

/* The stack of the vfork-like clone3 child: child_exec and the calls it makes use about 1.2 KiB
 * (gcc -fstack-usage; most of it restore_start_cpus's mask); .bss, so only the pages it touches
 * are ever made. 16-byte aligned top, as the trampoline needs. */
static char clone_stack[64 * 1024] __attribute__((aligned(16)));

/* Start the child directly in cgroup cg_dfd with clone3(CLONE_INTO_CGROUP): no moment outside
 * it, and cheaper than a write to cgroup.procs (the kernel skips the migration). In the
 * no-libc build on x86_64 vfork-like (CLONE_VM | CLONE_VFORK, on clone_stack; issue 15: the
 * copy of our memory a fork makes and exec throws away cost 30-50 us a run on a VM);
 * elsewhere fork-like: the shepherd is small and single-threaded, so the copy is cheap and
 * safe. Return the pid, or -1 with errno (ENOSYS/E2BIG/EINVAL: no clone3 or no
 * CLONE_INTO_CGROUP here). */
static __attribute__((noinline)) pid_t clone_into_cgroup_exec(int cg_dfd, const struct child_args *a)
{
    struct pg_clone_args ca;
    long pid;
    memset(&ca, 0, sizeof(ca));
    ca.flags = PG_CLONE_INTO_CGROUP;
    ca.exit_signal = SIGCHLD;
    ca.cgroup = (uint64_t)cg_dfd;
    if (nolibc_clone3_run) {
        /* the child reads a and runs on clone_stack while we are suspended (CLONE_VFORK) */
        ca.flags |= CLONE_VM | CLONE_VFORK;
        ca.stack = (uint64_t)(uintptr_t)clone_stack;
        ca.stack_size = sizeof(clone_stack);
        return (pid_t)nolibc_clone3_run(&ca, sizeof(ca), clone_child, (void *)a);
    }
    pid = syscall(SYS_clone3, &ca, sizeof(ca));
    if (pid == 0)
        child_exec(a);
    return (pid_t)pid;
}

/* Start the child in the run's cgroup (clone3, else vfork + cgroup.procs), or outside any
 * when st has none. Set *placed. Return the pid, or -1 with errno. */
static pid_t spawn_child(struct state *st, struct child_args *a, int *placed)
{
    pid_t pid;
    int saved;
    *placed = 0;
    a->procs_fd = -1;
    if (st->cg_dfd < 0)
        return vfork_exec(a);
    pid = clone_into_cgroup_exec(st->cg_dfd, a);
    if (pid >= 0 || (errno != ENOSYS && errno != E2BIG && errno != EINVAL)) {
        *placed = pid >= 0;
        return pid;  /* placed, or a refusal (EBUSY, EOPNOTSUPP, EACCES...) to report */
    }
    a->procs_fd = cg_open_file(st->cg_dfd, "cgroup.procs", O_WRONLY);
    if (a->procs_fd < 0)
        return -1;
    pid = vfork_exec(a);
    saved = errno;
    close(a->procs_fd);
    a->procs_fd = -1;
    errno = saved;
    *placed = pid >= 0;  /* the child reports a failed write as PG_STAGE_CGROUP */
    return pid;
}

/* Close what c holds of a cgroup (between runs, or once it is no longer ours). */
static void forget_cgroup(struct cg_cache *c)
{
    if (c->dfd >= 0)
        close(c->dfd);
    if (c->events >= 0)
        close(c->events);
    cg_files_close(&c->files);
    free(c->path);
    c->path = NULL;
    c->dfd = c->events = -1;
}

/* Give up cgroup mode for this run after the command could not be placed in the cgroup
 * (err): fail the start if it was required, else go on as a plain subreaper run. */
static void drop_cgroup(struct state *st, int err)
{
    if (st->cg_required)
        fail_start(st, PG_STAGE_CGROUP, err);
    st->final.cgroup_err = err;
    if (st->cg_events >= 0)
        close(st->cg_events);
    close(st->cg_dfd);
    st->cg_events = st->cg_dfd = -1;
    forget_cgroup(&st->cg);
}

/* Close the command's stdio fds: it has them, and its pipes must reach EOF when the tree is
 * gone, whatever we do afterwards. */
static void close_stdio(struct state *st)
{
    for (int i = 0; i < 4; i++)
        if (st->stdio[i] >= 0) {
            close(st->stdio[i]);
            st->stdio[i] = -1;
        }
}

/* Start the child and wait until it has exec'd (or failed to: *f filled in, pid returned
 * reaped). Return its pid, or -1 with errno when it could not be started at all. */
static pid_t start_child(struct state *st, struct child_args *a, struct child_failure *f,
                         int *placed)
{
    int err_pipe[2];
    ssize_t n;
    pid_t pid;
    if (pipe2(err_pipe, O_CLOEXEC) < 0)
        return -1;
    a->err_fd = err_pipe[1];
    pid = spawn_child(st, a, placed);
    close(err_pipe[1]);
    if (pid < 0) {
        int saved = errno;
        close(err_pipe[0]);
        errno = saved;
        return -1;
    }
    f->stage = 0;
    do {
        n = read(err_pipe[0], f, sizeof(*f));
    } while (n < 0 && errno == EINTR);
    close(err_pipe[0]);
    if (n == (ssize_t)sizeof(*f)) {
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
            ;
    } else {
        f->stage = 0;
    }
    return pid;
}

/* A shepherd that may serve again must not pin the directory it was started in (an unmount
 * would fail EBUSY): later runs bring their cwd (PG_REQ_CWD_FD or a path). Best effort: if
 * "/" cannot be entered, staying where it is harms nothing but that unmount. */
static void leave_cwd(const struct state *st)
{
    if (!(st->req_flags & PG_REQ_LAST) && chdir("/") == 0)
        return;
}

/* Start the command (in the run's cgroup if there is one); on failure report it and exit. */
static void start_command(struct state *st)
{
    /* a path is tried as given: no list to build (issue 15: two mmap and two munmap calls of
     * nolibc's allocator per run) */
    char *as_given[2] = {st->argv[0], NULL};
    struct child_args a = {st->self, -1, -1, st->stdio, st->cwd, NULL, st->argv, st->envp,
                           st->pin_cpu};
    struct child_failure f;
    pid_t pid;
    int placed;

    a.candidates = strchr(st->argv[0], '/') ? as_given : exec_candidates(st->argv[0], st->envp);
    if (!a.candidates)
        fail_start(st, PG_STAGE_SHEPHERD, ENOMEM);
    for (;;) {
        pid = start_child(st, &a, &f, &placed);
        if (pid < 0 && st->cg_dfd >= 0 && errno != EAGAIN && errno != ENOMEM) {
            drop_cgroup(st, errno);  /* the cgroup refused the child (EBUSY, EOPNOTSUPP...) */
            continue;
        }
        if (pid < 0)
            fail_start(st, PG_STAGE_SHEPHERD, errno);
        if (f.stage == PG_STAGE_CGROUP && !st->cg_required) {
            drop_cgroup(st, f.err);  /* nothing of the command ran yet: start it again */
            continue;
        }
        if (f.stage)
            fail_start(st, f.stage, f.err);
        break;
    }
    if (a.candidates != as_given) {
        for (char **c = a.candidates; *c; c++)
            free(*c);
        free(a.candidates);
    }
    st->leader = pid;
    st->leader_alive = 1;
    st->in_cgroup = placed;
    st->final.in_cgroup = placed;
    close_stdio(st);
    leave_cwd(st);
    {
        struct pg_record rec;
        memset(&rec, 0, sizeof(rec));
        rec.kind = PG_REC_STARTED;
        rec.pid = pid;
        rec.in_cgroup = placed;
        rec.cgroup_err = st->final.cgroup_err;
        rec.cg_some0_us = placed && (st->req_flags & PG_REQ_CG_REUSED) ? st->cg_some0 : -1;
        send_record(st, &rec);
    }
}

/* ---------------------------------------------------------------- the main loop */

/* Move to TERMINATING: the stop signal (SIGTERM unless told, GNU timeout -s) + SIGCONT to the
 * tree; return how many were signalled. With leaks set (the sweep after the command exited)
 * they are named to the caller too. */
static int begin_terminate(struct state *st, int leaks)
{
    int hit = signal_tree(st, st->stop_signal, leaks);
    st->phase = TERMINATING;
    st->phase_deadline_ns = now_ns() + st->grace_ns;
    return hit;
}

/* SIGKILL the whole tree: cgroup.kill in cgroup mode (atomic, forks included), else the
 * walk. Return how many were alive to be killed. */
static int kill_tree(struct state *st)
{
    int hit;
    if (!st->in_cgroup)
        return signal_tree(st, SIGKILL, 0);
    hit = signal_tree(st, 0, 0);
    st->cg_killed = 1;
    if (cg_kill(st->cg_dfd) < 0)
        signal_tree(st, SIGKILL, 0);  /* neither cgroup.kill nor the freezer: pid by pid */
    return hit;
}

/* Move to KILLING: SIGKILL whatever outlived the grace period. */
static void begin_kill(struct state *st)
{
    if (kill_tree(st) > 0)
        st->final.escalated = 1;
    st->phase = KILLING;
    st->phase_deadline_ns = now_ns() + GIVE_UP_AFTER_KILL_NS;
}

/* Return 1 if cgroup.events matters now: cgroup mode, and not RUNNING with the leader alive,
 * where step_running decides by the leader alone (its SIGCHLD wakes us). Issue 15: reading it
 * then was one wasted read per wake-up; it is not polled then either, since an unread change
 * keeps it POLLPRI (kernfs clears that on read) and poll would return at once, every time. */
static int watching_cgroup(const struct state *st)
{
    return st->in_cgroup && !(st->phase == RUNNING && st->leader_alive);
}

/* Return 1 if something of the tree may still be alive: the cgroup is populated (cgroup
 * mode, when watched), or the shepherd still has children (children_left, from reap()).
 * Both answers are kept for finish_cgroup. The read comes before each poll of cgroup.events
 * (supervise), so that a change after it is a fresh POLLPRI and none is missed. */
static int tree_left(struct state *st, int children_left)
{
    st->children_left = children_left;
    if (watching_cgroup(st)) {
        int populated = cg_populated(st->cg_dfd, st->cg_events);
        st->cg_empty = populated == 0;
        if (populated >= 0)
            return populated;
    }
    return children_left;
}

/* This run's share of a cpu.stat counter that stood at base when it began (reused: the
 * cgroup served an earlier run; else it is new and counts from 0). -1: unknown. */
static int64_t cpu_delta(int64_t now, int64_t base, int reused)
{
    if (!reused)
        return now;
    return now < 0 || base < 0 ? -1 : now - base;
}

/* Return 1 if this run's emptied cgroup may serve a later run (issue 15): asked to, and
 * nothing of the run left or came back (no child of ours left: one that moved itself out
 * could move back), no kill of ours or, as far as we can tell, of the command's own (a
 * cgroup.kill written from inside kills its writer: SIGKILL among what we reaped), and no
 * controller in it. The rest of cg_reusable's checks (as made, no BPF program: ~40 system
 * calls) come from check_kept_cgroup, after FINAL when the shepherd stays. */
static int keep_cgroup(struct state *st)
{
    return (st->req_flags & PG_REQ_CG_KEEP) && !st->cg_killed && !st->saw_sigkill &&
           !st->children_left && cg_no_controllers(st->cg_dfd, &st->cg.files);
}

/* The cgroup kept by finish_cgroup, checked whole (cg_reusable): one its command changed
 * (frozen, threaded, a child cgroup, a BPF program, a chmod...) is let go and removed.
 * Return 1 if it is still kept. */
static int check_kept_cgroup(struct state *st)
{
    char *path;
    if (!st->final.cgroup_kept)
        return 0;
    if (cg_reusable(st->cg.dfd, &st->cg.files, &st->cg.made))
        return 1;
    path = st->cg.path;
    st->cg.path = NULL;
    forget_cgroup(&st->cg);
    st->final.cgroup_kept = 0;
    st->final.cgroup_removed = path && cg_remove(path) == 0;
    free(path);
    return 0;
}

/* cgroup mode, once the tree is gone: reap the last members (they leave the cgroup a moment
 * before they are zombies; bounded, in case one moved itself to another cgroup), take the
 * cgroup's accounting, remove it. supervise has just seen the cgroup empty, and whether
 * children were left, in a normal end: neither is asked again (issue 15). */
static void finish_cgroup(struct state *st)
{
    struct cg_usage u;
    int keep, reused;
    if (!st->in_cgroup || !(st->cg_empty || cg_populated(st->cg_dfd, st->cg_events) == 0))
        return;  /* a member survived SIGKILL (unkillable): the caller tries rmdir later */
    for (int i = 0; i < 200 && st->children_left; i++) {
        struct timespec pause = {0, NS_PER_MS};
        st->children_left = reap(st);
        if (st->children_left)
            nanosleep(&pause, NULL);
    }
    /* Issue 15: a fresh cgroup per run costs ~200 us of kernel work (mkdir, the first task,
     * rmdir); one that ends as it was made serves the caller's next run instead. */
    keep = keep_cgroup(st);
    cg_read_usage(st->cg_dfd, &st->cg.files, keep, &u);
    reused = (st->req_flags & PG_REQ_CG_REUSED) != 0;
    st->final.cg_usage_us = cpu_delta(u.usage_us, st->cg_base.usage_us, reused);
    st->final.cg_user_us = cpu_delta(u.user_us, st->cg_base.user_us, reused);
    st->final.cg_system_us = cpu_delta(u.system_us, st->cg_base.system_us, reused);
    st->final.cg_memory_peak = u.memory_peak;
    st->final.cg_pids_peak = u.pids_peak;
    st->final.cg_oom_kill = u.oom_kill;
    st->final.cg_oom_group_kill = u.oom_group_kill;
    if (keep && (st->cg.path || (st->cg.path = strdup(st->cg_path)))) {
        st->cg.dfd = st->cg_dfd;  /* held while idle: the next run in it reads, not opens */
        st->cg.events = st->cg_events;
        st->final.cgroup_kept = 1;
    } else {
        close(st->cg_events);
        close(st->cg_dfd);
        forget_cgroup(&st->cg);
        st->final.cgroup_removed = cg_remove(st->cg_path) == 0;
    }
    st->cg_events = st->cg_dfd = -1;
}

/* open_cgroup for a cgroup this shepherd does not hold: open it and its cgroup.events, note
 * its directory as it is now. Return 0, or -1 if the run goes on without it. */
static int open_cgroup_fresh(struct state *st, const char *path)
{
    forget_cgroup(&st->cg);
    st->cg_dfd = cg_open(path);
    if (st->cg_dfd < 0) {
        int err = errno;
        st->cg_dfd = -1;
        if (st->req_flags & PG_REQ_CG_REUSED)  /* a kept one someone removed: nothing ran */
            fail_start(st, PG_STAGE_CGROUP, ESTALE);
        if (st->cg_required)
            fail_start(st, PG_STAGE_CGROUP, err);
        st->final.cgroup_err = err;
        return -1;
    }
    st->cg_events = cg_open_file(st->cg_dfd, "cgroup.events", O_RDONLY);
    if (st->cg_events < 0) {
        drop_cgroup(st, errno);  /* not a cgroup v2 directory */
        return -1;
    }
    if ((st->req_flags & PG_REQ_CG_KEEP) && cg_snapshot(st->cg_dfd, &st->cg.made) < 0)
        st->req_flags &= ~PG_REQ_CG_KEEP;
    return 0;
}

/* Open the run's cgroup at path (made by the caller), for this run: from st->cg if it is the
 * one this shepherd kept after its last run. A cgroup that cannot be opened fails the start
 * if it is required, else the run goes on without it. */
static void open_cgroup(struct state *st, const char *path)
{
    st->cg_path = path;
    if (st->cg.path && (st->req_flags & PG_REQ_CG_REUSED) && strcmp(st->cg.path, path) == 0) {
        st->cg_dfd = st->cg.dfd;
        st->cg_events = st->cg.events;
        st->cg.dfd = st->cg.events = -1;
    } else if (open_cgroup_fresh(st, path) < 0) {
        return;
    }
    if (!(st->req_flags & PG_REQ_CG_REUSED))
        return;
    /* Something of an earlier run that left the cgroup may have come back (write access to
     * its cgroup.procs is all it takes): this run must not count it, nor be counted with it.
     * A kept cgroup removed since (its files read ENODEV) is no cgroup for this run either. */
    if (cg_populated(st->cg_dfd, st->cg_events) != 0)
        fail_start(st, PG_STAGE_CGROUP, ESTALE);  /* nothing ran: the caller takes another */
    cg_read_cpu(st->cg_dfd, &st->cg.files, &st->cg_base);  /* empty: its counters rest */
    st->cg_some0 = cg_read_cpu_some(st->cg_dfd, &st->cg.files);
}

/* React to the caller: a terminate byte, or the socket closing because the caller died. */
static void on_control(struct state *st, short revents)
{
    char cmd;
    ssize_t n;
    if (revents & POLLIN) {
        n = recv(PG_CONTROL_FD, &cmd, 1, MSG_DONTWAIT);
        if (n == 1 && cmd != PG_CMD_TERMINATE)
            return;
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            return;
        if (n <= 0)
            st->caller_gone = 1;
    } else {
        st->caller_gone = 1;
    }
    if (st->phase == RUNNING) {
        st->final.terminated = 1;
        begin_terminate(st, 0);
    }
}

/* Read exactly n bytes of the request from the caller. Return 0, or -1 (EOF, error). */
static int read_full(void *buf, size_t n)
{
    char *p = buf;
    while (n > 0) {
        ssize_t got = read(PG_CONTROL_FD, p, n);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return -1;
        p += got;
        n -= (size_t)got;
    }
    return 0;
}

/* Receive a request's header and its three fds into st->stdio. Return 1, 0 if the caller
 * hung up (or sent something else: it is not run.c, or not of this build), -1 if the header
 * came without exactly three fds. */
static int recv_header(struct state *st, struct pg_request *req)
{
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(4 * sizeof(int))];
    } cm;
    struct iovec iov = {req, sizeof(*req)};
    struct msghdr msg;
    struct cmsghdr *c;
    ssize_t n;
    size_t nfds = 0;

    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cm.buf;
    msg.msg_controllen = sizeof(cm.buf);
    do {
        n = recvmsg(PG_CONTROL_FD, &msg, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n <= 0)
        return 0;
    c = CMSG_FIRSTHDR(&msg);  /* one sendmsg, one cmsg: CMSG_NXTHDR is a libc function */
    if (c && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
        nfds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < nfds; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            if (i < 4)
                st->stdio[i] = fd;
            else
                close(fd);
        }
    }
    if ((size_t)n < sizeof(*req) && read_full((char *)req + n, sizeof(*req) - (size_t)n) < 0)
        return 0;
    if (req->magic != PG_REQ_MAGIC)
        return 0;
    if (nfds != (req->flags & PG_REQ_CWD_FD ? 4u : 3u) || (msg.msg_flags & MSG_CTRUNC))
        return -1;
    return 1;
}

/* Point st->ptrs into the payload: [cwd] [cgroup] argv envp, each NUL-terminated, filling
 * it exactly. Return 0, or -1 for a malformed payload. */
static int split_payload(struct state *st, const struct pg_request *req, const char **cgroup)
{
    size_t want = (size_t)req->has_cwd + (size_t)req->has_cgroup + (size_t)req->argc +
                  (size_t)req->envc, got = 0;
    const char **fixed[2];
    char *p = st->payload, *end = st->payload + req->payload_len;
    size_t nfixed = 0;

    if (req->has_cwd)
        fixed[nfixed++] = &st->cwd;
    if (req->has_cgroup)
        fixed[nfixed++] = cgroup;
    memset(st->ptrs, 0, ((size_t)req->argc + (size_t)req->envc + 2) * sizeof(char *));
    while (p < end) {
        char *nul = memchr(p, '\0', (size_t)(end - p));
        if (!nul || got == want)
            return -1;
        if (got < nfixed) {
            *fixed[got] = p;
        } else {
            size_t j = got - nfixed;  /* argv's NULL sits between the two lists */
            st->ptrs[j < (size_t)req->argc ? j : j + 1] = p;
        }
        got++;
        p = nul + 1;
    }
    if (got != want)
        return -1;
    st->argv = st->ptrs;
    st->envp = st->ptrs + req->argc + 1;
    return 0;
}

/* Check a request's header; copy its settings into st. Return 0, or -1 if malformed. */
static int take_settings(struct state *st, const struct pg_request *req)
{
    if (req->argc < 1 || req->envc < 0 || (req->has_cwd | req->has_cgroup) & ~1 ||
        req->grace_ns < 0 || req->stop_signal < 1 || req->stop_signal >= NSIG ||
        req->payload_len == 0 || req->payload_len > PG_REQ_MAX_PAYLOAD ||
        (uint64_t)req->argc + (uint64_t)req->envc > req->payload_len ||
        req->pin_cpu < -1 || (req->pin_cpu >= 0 && (uint64_t)req->pin_cpu >= 8 * start_cpus_len))
        return -1;
    st->pin_cpu = req->pin_cpu;
    st->req_flags = req->flags;
    st->deadline_ns = req->deadline_ns < 0 ? -1 : req->deadline_ns;
    st->grace_ns = req->grace_ns;
    st->stop_signal = req->stop_signal;
    st->cg_required = (req->flags & PG_REQ_CG_REQUIRED) != 0;
    return 0;
}

/* Point st->payload and st->ptrs at room for req's strings and pointers, in one block kept
 * from run to run (grown when a request needs more): nolibc's malloc is an mmap and its free a
 * munmap, with fresh pages to fault in, two of each per run before. Return 0 or -1. */
static int request_space(struct state *st, const struct pg_request *req)
{
    size_t ptrs_at = (req->payload_len + 15) & ~(size_t)15;
    size_t need = ptrs_at + ((size_t)req->argc + (size_t)req->envc + 2) * sizeof(char *);
    if (need > st->space_len) {
        size_t len = (need + 65535) & ~(size_t)65535;
        free(st->space);
        st->space_len = 0;
        if (!(st->space = malloc(len)))
            return -1;
        st->space_len = len;
    }
    st->payload = st->space;
    st->ptrs = (char **)(st->space + ptrs_at);
    return 0;
}

/* Take the next request into st. Return 1, or 0 if the caller hung up; a malformed request
 * fails the start (EINVAL): it came from something other than run.c of this build. */
static int read_request(struct state *st)
{
    struct pg_request req;
    const char *cgroup = NULL;
    int got = recv_header(st, &req);
    if (got == 0) {
        close_stdio(st);
        return 0;
    }
    if (got < 0 || take_settings(st, &req) < 0)
        fail_start(st, PG_STAGE_SHEPHERD, EINVAL);
    if (request_space(st, &req) < 0)
        fail_start(st, PG_STAGE_SHEPHERD, ENOMEM);
    if (read_full(st->payload, req.payload_len) < 0) {
        close_stdio(st);
        return 0;
    }
    if (split_payload(st, &req, &cgroup) < 0)
        fail_start(st, PG_STAGE_SHEPHERD, EINVAL);
    if (cgroup)
        open_cgroup(st, cgroup);
    return 1;
}

/* Shield the shepherd from signals and return a signalfd for the ones it acts on; on
 * failure report it and exit. Signals arrive through the signalfd, never asynchronously:
 * no handlers, no races. */
static int open_signalfd(struct state *st)
{
    sigset_t mask;
    int sfd;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGHUP);
    if (shield_signals() < 0)
        fail_start(st, PG_STAGE_SHEPHERD, errno);
    sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0)
        fail_start(st, PG_STAGE_SHEPHERD, errno);
    return sfd;
}

/* Stop the run on request (the caller, a signal to the shepherd, a failed poll): the stop
 * sequence for the whole tree, once. */
static void request_stop(struct state *st)
{
    if (st->phase == RUNNING) {
        st->final.terminated = 1;
        begin_terminate(st, 0);
    }
}

/* RUNNING: decide what the state of the tree calls for. Return 1 if the phase changed (look
 * again at once), else 0 with *wake set to when to look again (-1: on events only). */
static int step_running(struct state *st, int children_left, int64_t now, int64_t *wake)
{
    if (st->caller_gone && st->leader_alive) {
        /* The caller went away (even before it heard that we started): nobody will ever
         * read the output or ask us to stop, so the tree must not live on. */
        request_stop(st);
        return 1;
    }
    if (!st->leader_alive) {
        if (!children_left)
            st->phase = DONE;
        else  /* the leader is gone but something of its tree is not: sweep it */
            st->final.swept_after_exit = begin_terminate(st, 1);
        return 1;
    }
    if (st->deadline_ns >= 0 && now >= st->deadline_ns) {
        st->final.timed_out = 1;
        st->final.killed_at_deadline = begin_terminate(st, 0);
        return 1;
    }
    *wake = st->deadline_ns;
    return 0;
}

/* TERMINATING and KILLING: as step_running, for the stop sequence. */
static int step_stopping(struct state *st, int children_left, int64_t now, int64_t *wake)
{
    if (!children_left) {
        st->phase = DONE;
        return 1;
    }
    if (now >= st->phase_deadline_ns) {
        if (st->phase == TERMINATING)
            begin_kill(st);
        else {  /* the give-up bound: what is left is reported, not waited for */
            st->final.unkillable = signal_tree(st, 0, 0);
            st->phase = DONE;
        }
        return 1;
    }
    if (st->phase == TERMINATING) {
        *wake = st->phase_deadline_ns;
        return 0;
    }
    /* Something forked between the walk and the kill, or is slow to die: repeat. */
    kill_tree(st);
    *wake = now + 5 * NS_PER_MS;
    return 0;
}

/* Return the poll() timeout in ms from now until wake (-1: none). */
static int poll_timeout_ms(int64_t wake, int64_t now)
{
    int64_t left, ms;
    if (wake < 0)
        return -1;
    left = wake - now;
    ms = left <= 0 ? 0 : (left + NS_PER_MS - 1) / NS_PER_MS;
    return ms > INT_MAX ? INT_MAX : (int)ms;  /* deadlines beyond 24.8 days */
}

/* Sleep until a signal, the caller, the cgroup or wake (-1: none), and react. */
static void wait_events(struct state *st, int sfd, int64_t wake, int64_t now)
{
    struct pollfd fds[3];
    int ready;
    fds[0].fd = sfd;
    fds[0].events = POLLIN;
    fds[1].fd = st->caller_gone ? -1 : PG_CONTROL_FD;
    fds[1].events = POLLIN;
    fds[2].fd = watching_cgroup(st) ? st->cg_events : -1;  /* POLLPRI: populated changed */
    fds[2].events = POLLPRI;
    ready = poll(fds, 3, poll_timeout_ms(wake, now));
    if (ready < 0) {
        if (errno != EINTR)
            request_stop(st);  /* poll itself failing (ENOMEM) must not leave the tree */
        return;
    }
    if (fds[0].revents & POLLIN) {
        /* several per read: a read short of the buffer has emptied the queue, so the read
         * that would fail with EAGAIN is saved (issue 15) */
        struct signalfd_siginfo si[8];
        ssize_t n;
        do {
            n = read(sfd, si, sizeof(si));
            for (ssize_t i = 0; i < n / (ssize_t)sizeof(si[0]); i++)
                if (si[i].ssi_signo != SIGCHLD)
                    request_stop(st);  /* someone asked us to stop: the tree goes down with us */
        } while (n == (ssize_t)sizeof(si));
    }
    if (fds[1].fd >= 0 && fds[1].revents)
        on_control(st, fds[1].revents);
}

/* Watch the tree until it is gone (or out of reach), driving the stop sequence. */
static void supervise(struct state *st, int sfd)
{
    st->phase = RUNNING;
    while (st->phase != DONE) {
        int64_t wake = -1, now;
        int children_left = tree_left(st, reap(st)), changed;

        now = now_ns();
        if (children_left && !tree_reachable(st)) {
            /* /proc is not ours and the leader is reaped: what is left cannot be found, and
             * signalling numbers blindly could hit bystanders. Reported as proc_foreign. */
            st->phase = DONE;
            break;
        }
        changed = st->phase == RUNNING ? step_running(st, children_left, now, &wake)
                                       : step_stopping(st, children_left, now, &wake);
        if (!changed)
            wait_events(st, sfd, wake, now);
    }
}

/* Everything is dead and reaped (or given up on): account for it and tell the caller. Return
 * 1 if the shepherd is clean and may serve the next run: asked to, the caller is there, and
 * nothing of this run is left (no child at all, no cgroup held open). */
static int send_idle(struct state *st);

static int send_final(struct state *st)
{
    finish_cgroup(st);
    st->final.pid = st->leader;
    /* A leader that outlived the give-up bound has SIGKILL pending: that is how it will end. */
    st->final.wait_status = st->leader_alive ? SIGKILL : st->leader_status;
    st->final.reusable = !(st->req_flags & PG_REQ_LAST) && !st->caller_gone && start_cpus_len &&
                         !st->leader_alive && st->final.unkillable == 0 && st->cg_dfd < 0 &&
                         !reap(st);
    if (!st->final.reusable)
        check_kept_cgroup(st);  /* no IDLE to come: the caller's next run may take it now */
    send_record(st, &st->final);
    return st->final.reusable && send_idle(st);
}

/* After a FINAL with reusable (issue 15): the checks the caller's next run needs and this
 * run's result does not, while the caller builds that result (~70-100 us that were between
 * the command's exit and the caller's return). The caller reads IDLE before it sends the
 * next request, and before a run takes the kept cgroup. A command can renice, prlimit or move
 * its parent: a shepherd changed so is not reused (the caller's fingerprint described it as
 * started). Return 1 if it waits for the next request. */
static int send_idle(struct state *st)
{
    struct pg_record rec;
    int mask_back;
    memset(&rec, 0, sizeof(rec));
    rec.kind = PG_REC_IDLE;
    rec.pid = st->self;
    rec.cgroup_kept = check_kept_cgroup(st);
    rec.cgroup_removed = st->final.cgroup_removed;
    /* our start mask back (the caller pins us again for its next run); if that fails, or
     * anyone changed it meanwhile, we are not reused */
    mask_back = st->pin_cpu < 0 ||
                syscall(SYS_sched_setaffinity, 0, start_cpus_len, start_cpus) == 0;
    rec.reusable = mask_back && own_state() == st->own0;
    send_record(st, &rec);
    return rec.reusable && !st->caller_gone;
}

/* Make st ready for a run: nothing of the last one kept but who we are. */
static void reset_run(struct state *st)
{
    pid_t self = st->self;
    int no_pidfd = st->no_pidfd;
    uint64_t own0 = st->own0;
    struct cg_cache cg = st->cg;
    char *space = st->space;
    size_t space_len = st->space_len;
    memset(st, 0, sizeof(*st));
    st->self = self;
    st->no_pidfd = no_pidfd;
    st->own0 = own0;
    st->cg = cg;
    st->space = space;
    st->space_len = space_len;
    st->final.kind = PG_REC_FINAL;
    st->final.wait_status = -1;
    /* the cgroup's accounting is absent until finish_cgroup reads it: a run whose cgroup
     * never empties reports none, not zeros */
    st->final.cg_usage_us = st->final.cg_user_us = st->final.cg_system_us = -1;
    st->final.cg_memory_peak = st->final.cg_pids_peak = -1;
    st->final.cg_oom_kill = st->final.cg_oom_group_kill = -1;
    st->cg_some0 = -1;
    st->pin_cpu = -1;
    st->cg_base.usage_us = st->cg_base.user_us = st->cg_base.system_us = -1;
    st->cg_dfd = st->cg_events = -1;
    st->stdio[0] = st->stdio[1] = st->stdio[2] = st->stdio[3] = -1;
}

/* Between runs: wait for the next request, or for the caller to hang up. A signal that would
 * stop a run (SIGTERM, SIGINT, SIGHUP) ends an idle shepherd. Return 1 when a request waits. */
static int wait_idle(int sfd)
{
    for (;;) {
        struct pollfd fds[2] = {{PG_CONTROL_FD, POLLIN, 0}, {sfd, POLLIN, 0}};
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return 0;
        }
        if (fds[1].revents & POLLIN) {
            struct signalfd_siginfo si[8];
            ssize_t n = read(sfd, si, sizeof(si));
            for (ssize_t i = 0; i < n / (ssize_t)sizeof(si[0]); i++)
                if (si[i].ssi_signo != SIGCHLD)
                    return 0;
        }
        if (fds[0].revents)
            return 1;  /* a request, or the hang-up read_request will see */
    }
}

int main(int argc, char **argv)
{
    struct state st;
    int sfd;

    memset(&st, 0, sizeof(st));
    st.self = getpid();
    st.cg.dfd = st.cg.events = -1;
    cg_files_init(&st.cg.files);
    reset_run(&st);
    if (fcntl(PG_CONTROL_FD, F_SETFD, FD_CLOEXEC) < 0)
        return 125;  /* no control socket: started by something other than run.c */
    close_inherited_fds();
    if (argc != 2 || strcmp(argv[1], PG_SERVE_ARG) != 0)
        fail_start(&st, PG_STAGE_SHEPHERD, EINVAL);
    /* Without the subreaper bit escapees would go to init; containment then degrades to the
     * process group, which is still what subprocess.run offers at best. */
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    sfd = open_signalfd(&st);
    st.own0 = own_state();
    read_start_cpus();
    while (wait_idle(sfd) && read_request(&st)) {
        /* cgroup mode: an orphan of the last run may have been handed to us a moment after
         * its cgroup emptied, a zombie; its rusage is not this run's. Alive: not clean. */
        if (reap(&st))
            fail_start(&st, PG_STAGE_SHEPHERD, EBUSY);
        st.final.utime_us = st.final.stime_us = st.final.maxrss_kb = 0;
        start_command(&st);
        supervise(&st, sfd);
        if (!send_final(&st))
            break;
        reset_run(&st);
    }
    reset_run(&st);
    free(st.space);  /* the last request (a sanitizer build checks for leaks at exit) */
    forget_cgroup(&st.cg);
    return 0;
}

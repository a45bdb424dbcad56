/* run(): the caller's side of the native runner.
 *
 * Hands the run to an idle shepherd (shepherd.c) started from the same inherited state as
 * the caller's now (pool.c), or starts one with posix_spawn, which glibc implements with
 * clone(CLONE_VM | CLONE_VFORK): no page tables are copied, so the cost is the same for a
 * 50 MB caller and a 5 GB one (fork() of a 500 MB Python process costs ~12 ms). The run
 * travels as a request on the shepherd's socket (protocol.h), with the command's stdio fds.
 * Then,
 * with the GIL released, it polls the command's stdout and stderr and the shepherd's
 * report socket, keeping a bounded head and tail of each stream, teeing and calling the
 * output callback as bytes arrive, until both pipes reach EOF and the final report is in.
 *
 * The deadline itself is enforced by the shepherd (it is the tree's parent and
 * subreaper); the caller only asks it to terminate early (KeyboardInterrupt, a callback
 * that raised) and keeps a backstop in case the shepherd itself is stopped or lost.
 */
#include "proc_group.h"
#include "capture.h"
#include "tailpipe.h"
#include "cgroup.h"
#include "child.h"
#include "evidence.h"
#include "pool.h"
#include "protocol.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define NS_PER_S 1000000000LL
#define PIPE_SIZE (1 << 20)
/* A read this long means the pipe was full at its default size (64 KiB): a chatty stream,
 * whose pipe is then enlarged (fewer wake-ups and copies). Quiet runs skip the two fcntl. */
#define PIPE_DEFAULT_SIZE (64 * 1024)
/* Poll at least this often so that Ctrl-C is seen even when the kernel delivered SIGINT
 * to another thread (Python's handler only flags it; our poll would not see EINTR). */
#define SIGNAL_CHECK_MS 200
/* Once the shepherd reported that the tree is gone, wait at most this long for EOF on the
 * output pipes (something outside the tree, handed our pipe via SCM_RIGHTS, may hold it). */
#define DRAIN_AFTER_FINAL_NS (NS_PER_S / 2)
/* The shepherd enforces the deadline; if it has not reported this long after deadline plus
 * grace (it was SIGSTOPped, or is stuck), the caller kills it and the group itself. */
#define BACKSTOP_SLACK_NS (15 * NS_PER_S)
/* cgroup mode, shepherd lost: after cgroup.kill, how long to wait for the cgroup to empty
 * before leaving it (a member in uninterruptible sleep; the shepherd's own give-up bound). */
#define CGROUP_EMPTY_WAIT_NS (10 * NS_PER_S)

/* The end's evidence read when the command closed its output stands for the end if the run
 * ended within this long after it (the shepherd's reap, check and rmdir take ~0.1 ms). */
#define EARLY_EVIDENCE_MAX_NS (5 * 1000000LL)

/* ---------------------------------------------------------------- helpers */

/* Return CLOCK_MONOTONIC in nanoseconds. */
static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NS_PER_S + ts.tv_nsec;
}

/* Close *fd if open and mark it closed; errors on close of a pipe end are not actionable. */
static void close_fd(int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

/* Hang up the shepherd's socket and close it: shutdown acts on the socket itself, so the
 * shepherd sees EOF even while a forked child of ours holds a copy of the fd. */
static void hang_up(int *fd)
{
    if (*fd >= 0)
        shutdown(*fd, SHUT_RDWR);
    close_fd(fd);
}

/* Move fd above the stdio and control numbers (0..3) so that the dup2 file actions of the
 * spawn cannot clobber one of our own ends (a caller that closed its stdin gets fd 0 from
 * pipe2). Return 0, or -1 with errno set. */
static int raise_fd(int *fd)
{
    int moved;
    if (*fd > PG_CONTROL_FD)
        return 0;
    moved = fcntl(*fd, F_DUPFD_CLOEXEC, PG_CONTROL_FD + 1);
    if (moved < 0)
        return -1;
    close(*fd);
    *fd = moved;
    return 0;
}

/* Write to a tee fd, best effort: a full disk must not fail the run. Return 0 or errno; the
 * first errno stops the tee and is reported (tee_errno: logged once, as the subprocess
 * backend logs it). */
static int tee_write(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* ---------------------------------------------------------------- the run */

struct run {
    /* inputs, copied out of Python objects so the GIL can be released */
    char *shepherd_path;
    char *req;             /* struct pg_request, then its payload (protocol.h) */
    size_t req_len;
    const char *exec_name; /* argv[0], in req */
    const char *cwd;       /* in req, or NULL */
    const char *env_start; /* the first environment string in req */
    const char *input;
    size_t input_len, input_off;
    int64_t timeout_ns, grace_ns;
    size_t capture_limit;
    int tee_fd;
    PyObject *on_output;   /* borrowed */
    PyObject *const *names; /* the module's (proc_group.h), borrowed: [0] stdout, [1] stderr */

    /* fds: ours to close */
    int out_r, err_r, in_w;
    struct pg_shepherd shepherd;  /* its pid, its socket (ctl: -1 once hung up), its pidfd */
    /* the idle shepherds (pool.c): how many to keep, the caller's state now */
    int pool_max;
    int have_fp;
    uint64_t fp;
    int keep_ctl;          /* FINAL said reusable: its socket, kept for the pool; else -1 */
    pid_t tid;             /* the calling thread (pool.c: pg_running_set) */
    int in_flight;         /* counted in runs_in_flight; alone: no other run was */
    int alone;

    struct capture cap[2];
    struct tailpipe tail[2];  /* the tail kept in pipes (tailpipe.h), when nothing reads chunks */
    char *scratch;         /* shared by both streams, allocated on first use (capture.h) */
    char scratch_fallback[4096];
    int pipe_grown[2];

    /* the report */
    struct pg_record rec_buf;
    size_t rec_got;
    int have_started, have_final, have_spawn_failure;
    struct pg_record started, final, spawn_failure;
    int tee_errno;
    int terminate_sent;
    int shepherd_lost;
    int64_t backstop_ns;   /* kill the shepherd if no final report by then; -1: none */
    const char *cg_path;   /* the run's cgroup (cgroup mode), or NULL */
    int cg_killed;         /* we wrote its cgroup.kill (the shepherd was lost) */
    int cg_removed;        /* it is gone after the run (by the shepherd or by us) */
    int cg_kept;           /* the shepherd left it for a later run (FINAL.cgroup_kept) */
    int cg_changed;        /* the kept cgroup asked for was changed by its last command */
    int cg_reused;         /* CGROUP_REUSED: it served an earlier run */
    int cg_path_released;  /* release_cgroup (or the spawn failure path) has run */
    struct pg_record leaks[PG_MAX_LEAKS];
    int n_leaks;
    int shepherd_status;
    int64_t start_ns, end_ns;

    /* the machine's counters around the run (evidence.h), when asked for */
    int evidence;
    int have_evidence;     /* ev0 and the kmsg cursor were taken: ev1 is due at the end */
    int early_evidence;    /* ev1 was read when the pipes closed, before FINAL arrived */
    struct ev_machine ev0, ev1;
    struct ev_kmsg kmsg;

    /* cgroup mode: the next run's cgroup, made while this one's shepherd starts its command */
    char *prepare_path;    /* NULL: none asked for */
    int prepare_tried, prepare_errno;  /* mkdir ran; 0: it made it */
};

/* Copy a bytes object into a new NUL-terminated C string; NULL with an exception set. */
static char *dup_bytes(PyObject *b)
{
    char *s;
    Py_ssize_t n;
    if (!PyBytes_Check(b)) {
        PyErr_SetString(PyExc_TypeError, "expected bytes");
        return NULL;
    }
    n = PyBytes_GET_SIZE(b);
    if (memchr(PyBytes_AS_STRING(b), '\0', (size_t)n)) {
        PyErr_SetString(PyExc_ValueError, "embedded NUL byte");
        return NULL;
    }
    s = PyMem_RawMalloc((size_t)n + 1);
    if (!s) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(s, PyBytes_AS_STRING(b), (size_t)n + 1);
    return s;
}

/* Build the shepherd's environment from the request (its own and its command's): a
 * sanitizer build of it reads its options there. NULL on ENOMEM. */
static char **request_environ(const struct run *r)
{
    const struct pg_request *h = (const struct pg_request *)r->req;
    char **v = PyMem_RawCalloc((size_t)h->envc + 1, sizeof(char *));
    const char *p = r->env_start;
    if (!v)
        return NULL;
    for (int32_t i = 0; i < h->envc; i++) {
        v[i] = (char *)p;
        p += strlen(p) + 1;
    }
    return v;
}

/* Hold a shepherd just started by its pidfd, before anything else can reap it. If none can
 * be had (EMFILE, ENFILE, ENOMEM), let it go (by pid: it is our unreaped child, moments old)
 * and return that errno: a run must not rest on a shepherd it cannot tell from a stranger.
 * Return 0 or an errno. */
static int hold_shepherd(struct pg_shepherd *sh)
{
    int err = pg_shepherd_hold(sh);
    if (err) {
        sh->pidfd = PG_PIDFD_NONE;
        pg_pool_retire(sh);
        pg_shepherd_clear(sh);
    }
    return err;
}

/* Start a shepherd: /dev/null as its fds 0..2, its end of a new socket as fd 3, in a session
 * of its own, held by a pidfd (child.c). Set r->shepherd. Return 0 or an errno. */
static int spawn_shepherd(struct run *r)
{
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t attr;
    sigset_t all, none;
    short flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF;
    char *argv[] = {r->shepherd_path, PG_SERVE_ARG, NULL};
    char **envp;
    int rc, sv[2];

    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        return errno;
    if (raise_fd(&sv[0]) || raise_fd(&sv[1])) {
        rc = errno;
        close_fd(&sv[0]);
        close_fd(&sv[1]);
        return rc;
    }
    if (!(envp = request_environ(r))) {
        close_fd(&sv[0]);
        close_fd(&sv[1]);
        return ENOMEM;
    }
    rc = posix_spawn_file_actions_init(&fa);
    if (rc)
        goto out;
    rc = posix_spawnattr_init(&attr);
    if (rc) {
        posix_spawn_file_actions_destroy(&fa);
        goto out;
    }
    /* Our socket ends are > 3 (raise_fd) and close-on-exec; dup2 clears the flag on the copy.
     * Not the caller's stdio: an idle shepherd must not hold a pipe its reader waits on. */
    if ((rc = posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDWR, 0)) ||
        (rc = posix_spawn_file_actions_adddup2(&fa, 0, 1)) ||
        (rc = posix_spawn_file_actions_adddup2(&fa, 0, 2)) ||
        (rc = posix_spawn_file_actions_adddup2(&fa, sv[1], PG_CONTROL_FD)))
        goto cleanup;
#ifdef POSIX_SPAWN_SETSID
    /* Its own session: a signal to the caller's process group (a terminal's Ctrl-C, a
     * supervisor's kill -- -PGID) must not take the shepherd down before it cleans up. */
    flags |= POSIX_SPAWN_SETSID;
#endif
    /* Default dispositions for everything (Python ignores SIGPIPE, a caller may ignore
     * SIGCHLD) and an empty mask: the command must start from a clean slate. */
    sigfillset(&all);
    sigemptyset(&none);
    if ((rc = posix_spawnattr_setsigdefault(&attr, &all)) ||
        (rc = posix_spawnattr_setsigmask(&attr, &none)) ||
        (rc = posix_spawnattr_setflags(&attr, flags)))
        goto cleanup;
    rc = posix_spawn(&r->shepherd.pid, r->shepherd_path, &fa, &attr, argv, envp);
cleanup:
    posix_spawnattr_destroy(&attr);
    posix_spawn_file_actions_destroy(&fa);
out:
    PyMem_RawFree(envp);
    close_fd(&sv[1]);
    if (rc) {
        close_fd(&sv[0]);
        return rc;
    }
    r->shepherd.ctl = sv[0];
    return hold_shepherd(&r->shepherd);
}

/* Send the run's request on ctl: the header with the command's stdin, stdout and stderr as
 * SCM_RIGHTS, then the payload. Return 0 or an errno (EPIPE: the shepherd is gone). */
static int send_request(struct run *r, int ctl, int in_r, int out_w, int err_w, int cwd_fd)
{
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(4 * sizeof(int))];
    } cm;
    int fds[4] = {in_r, out_w, err_w, cwd_fd};
    size_t nfds = cwd_fd >= 0 ? 4 : 3;
    /* the whole request in one call where the socket takes it (the shepherd's first
     * recvmsg reads the header and the fds, then the rest): one system call fewer per run */
    struct iovec iov = {r->req, r->req_len};
    struct msghdr msg;
    struct cmsghdr *c;
    size_t off;
    ssize_t n;

    memset(&msg, 0, sizeof(msg));
    memset(&cm, 0, sizeof(cm));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cm.buf;
    msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
    c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
    memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
    do {
        n = sendmsg(ctl, &msg, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno;
    for (off = (size_t)n; off < r->req_len; off += (size_t)n) {  /* the rest: plain bytes */
        n = send(ctl, r->req + off, r->req_len - off, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) {
            n = 0;
            continue;
        }
        if (n < 0)
            return errno;
    }
    return 0;
}

/* Ask the shepherd to take the tree down now (idempotent). */
static void send_terminate(struct run *r)
{
    char cmd = PG_CMD_TERMINATE;
    int64_t backstop;
    if (r->terminate_sent || r->shepherd.ctl < 0)
        return;
    r->terminate_sent = 1;
    /* From here on we wait for the shepherd without checking signals: bound that wait even
     * without a timeout, in case the shepherd is stopped or stuck. */
    backstop = now_ns() + r->grace_ns + BACKSTOP_SLACK_NS;
    if (r->backstop_ns < 0 || backstop < r->backstop_ns)
        r->backstop_ns = backstop;
    while (send(r->shepherd.ctl, &cmd, 1, MSG_NOSIGNAL | MSG_DONTWAIT) < 0 && errno == EINTR)
        ;
}

/* The shepherd is gone or stuck, the tree is ours to kill: the leader's group (PDEATHSIG
 * took the leader) and, in cgroup mode, the whole cgroup, setsid escapees included. */
static void kill_lost_tree(struct run *r)
{
    r->shepherd_lost = 1;
    if (r->have_started)
        kill(-r->started.pid, SIGKILL);
    if (r->cg_path && !r->cg_killed) {
        int dfd = cg_open(r->cg_path);
        if (dfd >= 0) {
            r->cg_killed = cg_kill(dfd) == 0;
            close(dfd);
        }
    }
}

/* Take in whatever the shepherd sent; mark the socket closed at EOF. */
static void read_reports(struct run *r)
{
    for (;;) {
        ssize_t n = recv(r->shepherd.ctl, (char *)&r->rec_buf + r->rec_got,
                         sizeof(r->rec_buf) - r->rec_got, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            hang_up(&r->shepherd.ctl);  /* ECONNRESET: treat as EOF */
            if (!r->have_final)
                kill_lost_tree(r);
            return;
        }
        if (n == 0) {
            hang_up(&r->shepherd.ctl);
            if (!r->have_final) {
                /* The shepherd died before the tree did (someone SIGKILLed it). PDEATHSIG took
                 * the leader; the rest of its group is ours to kill, and in cgroup mode the
                 * whole cgroup. Without a cgroup, escapees that left the group are out of our
                 * reach: documented in docs/internals.md. */
                kill_lost_tree(r);
            }
            return;
        }
        r->rec_got += (size_t)n;
        if (r->rec_got < sizeof(r->rec_buf))
            continue;
        r->rec_got = 0;
        switch (r->rec_buf.kind) {
        case PG_REC_STARTED:
            r->started = r->rec_buf;
            r->have_started = 1;
            break;
        case PG_REC_SPAWN_FAILED:
            r->spawn_failure = r->rec_buf;
            r->have_spawn_failure = 1;
            break;
        case PG_REC_FINAL:
            /* The last record of the run: the shepherd now waits for the next request
             * (reusable) or exits. Either way nothing more is read: no wait for its EOF, a
             * second wake-up per run (issue 15). A shepherd that may have a terminate byte
             * of ours still unread is not reused. */
            r->final = r->rec_buf;
            r->have_final = 1;
            if (r->final.reusable && r->have_fp && !r->terminate_sent) {
                /* its IDLE record (its own checks) is read when a run takes it */
                r->shepherd.pending = 1;
                r->shepherd.cg_key = r->final.cgroup_kept && r->cg_path ? pg_path_key(r->cg_path) : 0;
                r->keep_ctl = r->shepherd.ctl;
                r->shepherd.ctl = -1;
            } else {
                hang_up(&r->shepherd.ctl);
            }
            return;
        case PG_REC_LEAK:
            if (r->n_leaks < PG_MAX_LEAKS)
                r->leaks[r->n_leaks++] = r->rec_buf;
            break;
        default:
            break;
        }
    }
}

/* Move what stream i's line of pipes holds into its capture's ring (tailpipe.h). */
static void flush_tail(struct run *r, int i, PyThreadState **ts)
{
    tailpipe_flush(&r->tail[i], &r->cap[i], &r->scratch, r->scratch_fallback,
                   sizeof(r->scratch_fallback), ts);
}

/* Read once from stream i (0 stdout, 1 stderr) into its capture; tee it. Called without the
 * GIL (*ts: the released thread state, taken back briefly when the capture grows). Return the
 * number of bytes read (their start in *chunk), 0 at EOF/error (fd closed), -1 on EAGAIN. */
static ssize_t read_stream(struct run *r, int i, int *fd, const char **chunk, PyThreadState **ts)
{
    size_t room;
    char *slot;
    ssize_t n = -2;
    if (r->tail[i].state == TP_ON ||
        (!r->on_output && r->tee_fd < 0 && tailpipe_wanted(&r->tail[i], &r->cap[i]))) {
        n = tailpipe_take(&r->tail[i], &r->cap[i], *fd);  /* -2: it gave up; read on */
        if (n == -2)
            flush_tail(r, i, ts);
        *chunk = NULL;  /* nobody wants the chunk (no callback, no tee) */
    }
    if (n == -2) {
        slot = capture_slot(&r->cap[i], &r->scratch, r->scratch_fallback,
                            sizeof(r->scratch_fallback), &room, ts);
        do {
            n = read(*fd, slot, room);
        } while (n < 0 && errno == EINTR);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return -1;
        if (n > 0)
            capture_commit(&r->cap[i], slot, (size_t)n, ts);
        *chunk = slot;
    }
    if (n == -1)
        return -1;
    if (n <= 0) {
        close_fd(fd);
        return 0;
    }
    if (n >= PIPE_DEFAULT_SIZE && !r->pipe_grown[i]) {
        r->pipe_grown[i] = 1;
        fcntl(*fd, F_SETPIPE_SZ, PIPE_SIZE);  /* best effort: pipe-max-size may refuse */
    }
    if (r->tee_fd >= 0 && !r->tee_errno)
        r->tee_errno = tee_write(r->tee_fd, *chunk, (size_t)n);
    return n;
}

/* Feed pending input to the child's stdin; close it when done or when the child closed it. */
static void write_input(struct run *r)
{
    while (r->input_off < r->input_len) {
        size_t left = r->input_len - r->input_off;
        ssize_t n = write(r->in_w, r->input + r->input_off, left > PIPE_BUF * 16 ? PIPE_BUF * 16 : left);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return;
            break;  /* EPIPE: the child closed stdin; the rest is simply not read */
        }
        r->input_off += (size_t)n;
    }
    close_fd(&r->in_w);
}

/* Done with the shepherd: keep it for a later run if FINAL said it is clean (pool.c), else
 * wait for it to exit and record how (the caller has hung up its socket end). One that code
 * outside retest reaped first is not waited for (its status: -1, unknown). */
static void release_shepherd(struct run *r)
{
    int status = 0;
    if (r->keep_ctl >= 0) {  /* idle and clean: kept for a later run (or let go if not) */
        r->shepherd.ctl = r->keep_ctl;
        r->keep_ctl = -1;
        pg_pool_give(r->fp, &r->shepherd, r->pool_max);
        pg_shepherd_clear(&r->shepherd);  /* its fds are the pool's now */
        r->shepherd_status = 0;
        return;
    }
    r->shepherd_status = pg_shepherd_wait(&r->shepherd, 0, &status) == 1 ? status : -1;
    pg_shepherd_close_pidfd(&r->shepherd);
    r->shepherd.pid = -1;
}

/* Call the output callback with the GIL held. Return 0, or -1 with an exception set. */
static int call_on_output(struct run *r, int i, const char *chunk, ssize_t n)
{
    PyObject *data, *res;
    data = PyBytes_FromStringAndSize(chunk, n);
    if (!data)
        return -1;
    res = PyObject_CallFunctionObjArgs(r->on_output, r->names[i], data, NULL);
    Py_DECREF(data);
    if (!res)
        return -1;
    Py_DECREF(res);
    return 0;
}

/* What pump() carries across the GIL: the released thread state and a pending exception. */
struct pump_state {
    PyThreadState *ts;
    PyObject *exc_type, *exc_value, *exc_tb;
};

/* Read once from stream s and hand the chunk to the callback (taking the GIL for it); a
 * callback that raises stops further callbacks and takes the tree down. Return read_stream's
 * result. */
static ssize_t pump_stream(struct run *r, struct pump_state *ps, int s)
{
    int *fd = s == 0 ? &r->out_r : &r->err_r;
    const char *chunk;
    ssize_t n = read_stream(r, s, fd, &chunk, &ps->ts);
    if (n > 0 && r->on_output && !ps->exc_type) {
        PyEval_RestoreThread(ps->ts);
        if (call_on_output(r, s, chunk, n) < 0) {
            PyErr_Fetch(&ps->exc_type, &ps->exc_value, &ps->exc_tb);
            send_terminate(r);
        }
        ps->ts = PyEval_SaveThread();
    }
    return n;
}

/* The tree is gone but a pipe is still open: take what is already buffered (bounded by the
 * pipe size once no writer is left in the tree), so a slow callback never costs the last
 * lines, the pytest summary among them. A writer outside the tree is cut off after that. */
static void final_drain(struct run *r, struct pump_state *ps)
{
    for (int s = 0; s < 2; s++) {
        size_t taken = 0;
        while ((s == 0 ? r->out_r : r->err_r) >= 0 && taken < 4 * (size_t)PIPE_SIZE) {
            ssize_t n = pump_stream(r, ps, s);
            if (n <= 0)
                break;
            taken += (size_t)n;
        }
    }
}

struct child_fds;
static void read_evidence_after(struct run *r);
static void check_signals(struct run *r, struct pump_state *ps);
static int start_run(struct run *r, struct child_fds *cf);
static void finish_run(struct run *r, int completed);

/* The poll loop's periodic look (no GIL held on entry or exit): records the socket may hold,
 * then Python's signal handlers. A pipe held open outside the tree (handed over by
 * SCM_RIGHTS) must not hide FINAL: an idle shepherd does not hang up after it, so the socket
 * is read every 200 ms. Also on a busy stream: output that never lets poll time out must not
 * hide Ctrl-C. */
static void check_signals(struct run *r, struct pump_state *ps)
{
    if (r->shepherd.ctl >= 0)
        read_reports(r);
    PyEval_RestoreThread(ps->ts);
    if (PyErr_CheckSignals() < 0) {
        if (!ps->exc_type) {
            /* first Ctrl-C: the shepherd takes the tree down with SIGTERM, grace, SIGKILL */
            PyErr_Fetch(&ps->exc_type, &ps->exc_value, &ps->exc_tb);
            send_terminate(r);
        } else {
            /* a second one while waiting for that: do not wait out the grace period */
            PyErr_Clear();
            r->backstop_ns = now_ns();
        }
    }
    ps->ts = PyEval_SaveThread();
}

/* Start the run, then the poll loop. Entered and left with the GIL held; releases it for the
 * whole run (taken back only for the output callback and a growing capture). Return 0 (with
 * *start_err an errno if no shepherd could be started), or -1 with a pending exception
 * (already handled: the tree is down). */
static int pump(struct run *r, struct child_fds *cf, int *start_err)
{
    struct pump_state ps = {NULL, NULL, NULL, NULL};
    int64_t drain_deadline_ns = -1, last_signal_check_ns = now_ns();

    r->backstop_ns = -1;
    if (r->timeout_ns >= 0)
        r->backstop_ns = r->start_ns + r->timeout_ns + r->grace_ns + BACKSTOP_SLACK_NS;

    ps.ts = PyEval_SaveThread();
    *start_err = start_run(r, cf);
    if (*start_err) {
        PyEval_RestoreThread(ps.ts);
        return 0;
    }
    while (r->out_r >= 0 || r->err_r >= 0 || r->shepherd.ctl >= 0) {
        struct pollfd fds[4];
        int nfds = 0, idx_out = -1, idx_err = -1, idx_ctl = -1, idx_in = -1, ready;
        int64_t now = now_ns(), wait_ms = SIGNAL_CHECK_MS;

        if ((r->have_final || r->shepherd_lost) && r->shepherd.ctl < 0) {
            if (drain_deadline_ns < 0) {
                drain_deadline_ns = now + DRAIN_AFTER_FINAL_NS;
            } else if (now >= drain_deadline_ns) {
                final_drain(r, &ps);
                break;  /* a holder outside the tree keeps the pipe open: stop waiting */
            }
        }
        if (r->backstop_ns >= 0 && now >= r->backstop_ns && !r->have_final &&
            r->shepherd.pid > 0) {
            /* The shepherd is stuck or stopped: kill it; PDEATHSIG takes the leader down.
             * ESRCH: it is dead and reaped already (by code outside retest), nothing to do. */
            pg_shepherd_signal(&r->shepherd, SIGKILL);
            kill_lost_tree(r);
            r->backstop_ns = -1;
        }
        if (r->out_r >= 0) {
            idx_out = nfds;
            fds[nfds].fd = r->out_r;
            fds[nfds++].events = POLLIN;
        }
        if (r->err_r >= 0) {
            idx_err = nfds;
            fds[nfds].fd = r->err_r;
            fds[nfds++].events = POLLIN;
        }
        if (r->shepherd.ctl >= 0) {
            /* While the output pipes are open, only the shepherd's death (POLLHUP, always
             * reported) matters on the socket: STARTED and LEAK records wait in its buffer,
             * and FINAL comes after the tree, and so the pipes' writers, are gone. One
             * wake-up per run fewer (issue 15). */
            idx_ctl = nfds;
            fds[nfds].fd = r->shepherd.ctl;
            fds[nfds++].events = r->out_r >= 0 || r->err_r >= 0 ? 0 : POLLIN;
        }
        if (r->in_w >= 0) {
            idx_in = nfds;
            fds[nfds].fd = r->in_w;
            fds[nfds++].events = POLLOUT;
        }
        if (drain_deadline_ns >= 0 && (drain_deadline_ns - now) / 1000000 + 1 < wait_ms)
            wait_ms = (drain_deadline_ns - now) / 1000000 + 1;
        if (r->backstop_ns >= 0 && (r->backstop_ns - now) / 1000000 + 1 < wait_ms)
            wait_ms = (r->backstop_ns - now) / 1000000 + 1;
        if (wait_ms < 0)
            wait_ms = 0;
        ready = poll(fds, (nfds_t)nfds, (int)wait_ms);
        if (ready < 0 && errno != EINTR) {
            /* EINVAL/ENOMEM: nothing sensible to wait on; take the tree down and finish. */
            send_terminate(r);
            r->shepherd_lost = 1;
            break;
        }
        if ((ready <= 0 || now_ns() - last_signal_check_ns >= SIGNAL_CHECK_MS * 1000000LL) &&
            !r->shepherd_lost && !r->have_final) {
            check_signals(r, &ps);
            last_signal_check_ns = now_ns();
            continue;  /* re-evaluate the backstop before polling again */
        }
        if (ready <= 0)
            continue;
        if (idx_ctl >= 0 && fds[idx_ctl].revents)
            read_reports(r);
        if (idx_in >= 0 && fds[idx_in].revents)
            write_input(r);
        if (idx_out >= 0 && fds[idx_out].revents && r->out_r >= 0)
            pump_stream(r, &ps, 0);
        if (idx_err >= 0 && fds[idx_err].revents && r->err_r >= 0)
            pump_stream(r, &ps, 1);
        if (r->have_evidence && !r->early_evidence && r->out_r < 0 && r->err_r < 0 &&
            !r->have_final) {
            /* The command closed its output (it exited, in the common case): read the end
             * now, while the shepherd reaps, checks and removes the cgroup before FINAL. */
            read_evidence_after(r);
            r->early_evidence = 1;
        }
    }
    close_fd(&r->in_w);
    hang_up(&r->shepherd.ctl);
    close_fd(&r->out_r);
    close_fd(&r->err_r);
    flush_tail(r, 0, &ps.ts);  /* the tails kept in pipes, into their rings */
    flush_tail(r, 1, &ps.ts);
    if (r->shepherd.pid > 0)
        release_shepherd(r);
    r->end_ns = now_ns();
    finish_run(r, ps.exc_type == NULL);
    PyEval_RestoreThread(ps.ts);
    if (ps.exc_type) {
        PyErr_Restore(ps.exc_type, ps.exc_value, ps.exc_tb);
        return -1;
    }
    return 0;
}

/* cgroup mode, after the run, without the GIL: remove the run's cgroup unless the shepherd
 * did. If the shepherd was lost, its tree was killed (kill_lost_tree): first wait, bounded,
 * for the cgroup to empty. Return 1 if it is gone. */
static int release_cgroup(struct run *r)
{
    if (r->have_final && r->final.cgroup_removed)
        return 1;
    if (r->have_spawn_failure && r->spawn_failure.stage == PG_STAGE_CGROUP &&
        r->spawn_failure.err == ESTALE)
        return 0;  /* a kept cgroup with a stranger in it: not ours to wait for, nor remove */
    if (r->have_final && r->final.cgroup_kept && !r->shepherd_lost) {
        r->cg_kept = 1;
        return 0;
    }
    if (r->shepherd_lost) {
        int dfd = cg_open(r->cg_path);
        if (dfd >= 0) {
            if (!r->cg_killed)
                cg_kill(dfd);
            cg_wait_empty(dfd, CGROUP_EMPTY_WAIT_NS);
            close(dfd);
        }
    }
    return cg_remove(r->cg_path) == 0;
}

/* The processes left after the command exited, as a tuple of (pid, cmdline head, age_s)
 * tuples; age_s is None when unknown. NULL with an exception set. */
static PyObject *leaks_tuple(const struct run *r)
{
    PyObject *t = PyTuple_New(r->n_leaks);
    if (!t)
        return NULL;
    for (int i = 0; i < r->n_leaks; i++) {
        const struct pg_record *l = &r->leaks[i];
        int len = l->text_len < 0 ? 0 : l->text_len > PG_LEAK_TEXT ? PG_LEAK_TEXT : l->text_len;
        PyObject *age = l->age_us < 0 ? (Py_INCREF(Py_None), Py_None)
                                      : PyFloat_FromDouble((double)l->age_us / 1e6);
        PyObject *text = PyUnicode_DecodeFSDefaultAndSize(l->text, len);
        PyObject *item = age && text ? Py_BuildValue("(iOO)", (int)l->pid, text, age) : NULL;
        Py_XDECREF(age);
        Py_XDECREF(text);
        if (!item) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, item);
    }
    return t;
}

/* Return v as an int, or None for -1 (absent). */
static PyObject *int_or_none(int64_t v)
{
    if (v < 0)
        Py_RETURN_NONE;
    return PyLong_FromLongLong(v);
}

static const char *stage_name(int stage)
{
    switch (stage) {
    case PG_STAGE_CGROUP:
        return "cgroup";
    case PG_STAGE_CHDIR:
        return "chdir";
    case PG_STAGE_EXEC:
        return "exec";
    case PG_STAGE_SETSID:
        return "setsid";
    case PG_STAGE_SPAWN:
        return "spawn";
    default:
        return "shepherd";
    }
}

/* RunResult.spawn_error: "exec '/bin/x': No such file or directory". A failure before the
 * command could start (PG_STAGE_SPAWN: the run's own pipes, socket or shepherd) says so,
 * rather than reading as the command's, and an fd limit names itself. */
static PyObject *spawn_error_text(int stage, PyObject *path, int err)
{
    struct rlimit lim;
    char limit[64] = "";
    if (stage != PG_STAGE_SPAWN)
        return PyUnicode_FromFormat("%s %R: %s", stage_name(stage), path, strerror(err));
    if (err == EMFILE && getrlimit(RLIMIT_NOFILE, &lim) == 0)
        snprintf(limit, sizeof(limit), " (RLIMIT_NOFILE %llu)", (unsigned long long)lim.rlim_cur);
    return PyUnicode_FromFormat("the run's own pipes, socket or shepherd for %R: %s%s: the "
                                "command never ran", path, strerror(err), limit);
}

/* One ev_machine reading as a tuple of ints (-1: absent), in proc_group.py's order. */
static PyObject *machine_tuple(const struct ev_machine *m)
{
    const int64_t *psi[4] = {m->psi_some_total, m->psi_full_total, m->psi_some_avg10,
                             m->psi_full_avg10};
    int64_t v[5 + 4 * EV_PSI_RESOURCES];
    int n = 0;
    PyObject *t;
    v[n++] = m->at_ns;
    for (int k = 0; k < 4; k++)
        for (int i = 0; i < EV_PSI_RESOURCES; i++)
            v[n++] = psi[k][i];
    v[n++] = m->busy_ticks;
    v[n++] = m->self_cpu_us;
    v[n++] = m->oom_kill;
    v[n++] = m->oom_group_kill;
    if (!(t = PyTuple_New(n)))
        return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *x = PyLong_FromLongLong(v[i]);
        if (!x) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, x);
    }
    return t;
}

/* The evidence of the run: (before, after, kmsg records or None, kmsg complete, kmsg errno),
 * or None when it was not asked for or the command never started. */
static PyObject *evidence_tuple(const struct run *r)
{
    PyObject *before, *after, *kept = Py_None, *t;
    if (!r->have_evidence)
        Py_RETURN_NONE;
    if (r->kmsg.open_errno == 0) {
        if (!(kept = PyTuple_New(r->kmsg.n_kept)))
            return NULL;
        for (int i = 0; i < r->kmsg.n_kept; i++) {
            PyObject *line = PyBytes_FromString(r->kmsg.kept[i]);
            if (!line) {
                Py_DECREF(kept);
                return NULL;
            }
            PyTuple_SET_ITEM(kept, i, line);
        }
    } else {
        Py_INCREF(kept);
    }
    before = machine_tuple(&r->ev0);
    after = machine_tuple(&r->ev1);
    t = before && after ? Py_BuildValue("(OOOOi)", before, after, kept,
                                        r->kmsg.complete ? Py_True : Py_False, r->kmsg.open_errno)
                        : NULL;
    Py_XDECREF(before);
    Py_XDECREF(after);
    Py_DECREF(kept);
    return t;
}

/* Set d[key] = value, stealing the reference to value. Return 0 or -1. */
static int set_item(PyObject *d, PyObject *key, PyObject *value)
{
    int rc;
    if (!value)
        return -1;
    rc = PyDict_SetItem(d, key, value);
    Py_DECREF(value);
    return rc;
}

/* The module's interned name n (proc_group.h's PG_NAMES), borrowed. */
#define NAME(n) (r->names[PG_N_##n])

_Static_assert(PG_N_stdout == 0 && PG_N_stderr == 1, "names[i] is stream i's name");

/* Build the result dict (the keyword arguments of RunResult minus args/backend). */
static PyObject *build_result(struct run *r, const char *exec_arg, const char *cwd_arg)
{
    PyObject *d = PyDict_New(), *spawn_error = Py_None, *spawn_errno = Py_None, *rc = Py_None;
    unsigned long long dropped[2];
    int failed = 0;
    /* cgroup mode: the cgroup's own accounting covers every member, reaped by us or not */
    int in_cgroup = r->cg_path && (r->have_started ? r->started.in_cgroup : r->final.in_cgroup);
    int cg_err = r->have_started ? r->started.cgroup_err : r->final.cgroup_err;
    int cg_cpu = in_cgroup && r->have_final && r->final.cg_user_us >= 0;
    int64_t user_us = cg_cpu ? r->final.cg_user_us : r->final.utime_us;
    int64_t system_us = cg_cpu ? r->final.cg_system_us : r->final.stime_us;
    if (!d)
        return NULL;
    Py_INCREF(Py_None);
    Py_INCREF(Py_None);
    Py_INCREF(Py_None);

    if (r->have_spawn_failure) {
        int stage = r->spawn_failure.stage;
        const char *what = stage == PG_STAGE_CHDIR ? cwd_arg
                           : stage == PG_STAGE_CGROUP && r->cg_path ? r->cg_path : exec_arg;
        PyObject *path = PyUnicode_DecodeFSDefault(what);
        Py_DECREF(spawn_error);
        Py_DECREF(spawn_errno);
        spawn_error = path ? spawn_error_text(stage, path, r->spawn_failure.err) : NULL;
        Py_XDECREF(path);
        spawn_errno = PyLong_FromLong(r->spawn_failure.err);
        if (!spawn_error || !spawn_errno)
            failed = 1;
    } else if (!r->have_final || r->shepherd_lost) {
        Py_DECREF(spawn_error);
        if (r->shepherd_status != -1 && WIFSIGNALED(r->shepherd_status))
            spawn_error = PyUnicode_FromFormat("retest shepherd lost: killed by signal %d",
                                               WTERMSIG(r->shepherd_status));
        else
            spawn_error = PyUnicode_FromString("retest shepherd lost: no final report");
        if (!spawn_error)
            failed = 1;
    } else if (r->final.wait_status >= 0) {
        int st = r->final.wait_status;
        Py_DECREF(rc);
        rc = PyLong_FromLong(WIFSIGNALED(st) ? -WTERMSIG(st) : WEXITSTATUS(st));
        if (!rc)
            failed = 1;
    }
    if (failed) {
        Py_XDECREF(spawn_error);
        Py_XDECREF(spawn_errno);
        Py_XDECREF(rc);
        Py_DECREF(d);
        return NULL;
    }
    /* set_item steals each reference even when it fails, so a failure part-way leaks nothing */
    if ((set_item(d, NAME(returncode), rc) < 0) | (set_item(d, NAME(spawn_error), spawn_error) < 0) |
        (set_item(d, NAME(spawn_errno), spawn_errno) < 0) ||
        set_item(d, NAME(unkillable), PyLong_FromLong(r->final.unkillable)) < 0 ||
        set_item(d, NAME(proc_foreign), PyBool_FromLong(r->final.proc_foreign)) < 0 ||
        set_item(d, NAME(tee_errno), r->tee_errno ? PyLong_FromLong(r->tee_errno)
                                              : (Py_INCREF(Py_None), Py_None)) < 0 ||
        set_item(d, NAME(stdout), capture_finish(&r->cap[0], &dropped[0])) < 0 ||
        set_item(d, NAME(stderr), capture_finish(&r->cap[1], &dropped[1])) < 0 ||
        set_item(d, NAME(stdout_dropped), PyLong_FromUnsignedLongLong(dropped[0])) < 0 ||
        set_item(d, NAME(stderr_dropped), PyLong_FromUnsignedLongLong(dropped[1])) < 0 ||
        set_item(d, NAME(timed_out), PyBool_FromLong(r->final.timed_out)) < 0 ||
        set_item(d, NAME(escalated), PyBool_FromLong(r->final.escalated)) < 0 ||
        set_item(d, NAME(killed_at_deadline), PyLong_FromLong(r->final.killed_at_deadline)) < 0 ||
        set_item(d, NAME(swept_after_exit), PyLong_FromLong(r->final.swept_after_exit)) < 0 ||
        set_item(d, NAME(pid), r->have_started ? PyLong_FromLong(r->started.pid) : (Py_INCREF(Py_None), Py_None)) < 0 ||
        set_item(d, NAME(duration_s), PyFloat_FromDouble((double)(r->end_ns - r->start_ns) / 1e9)) < 0 ||
        set_item(d, NAME(user_cpu_s), PyFloat_FromDouble((double)user_us / 1e6)) < 0 ||
        set_item(d, NAME(sys_cpu_s), PyFloat_FromDouble((double)system_us / 1e6)) < 0 ||
        set_item(d, NAME(max_rss_kb), PyLong_FromLongLong(r->final.maxrss_kb)) < 0 ||
        set_item(d, NAME(containment), Py_NewRef(in_cgroup ? NAME(cgroup) : NAME(subreaper))) < 0 ||
        set_item(d, NAME(cgroup), in_cgroup ? PyUnicode_DecodeFSDefault(r->cg_path)
                                        : (Py_INCREF(Py_None), Py_None)) < 0 ||
        set_item(d, NAME(cgroup_errno), int_or_none(r->cg_path && !in_cgroup && cg_err > 0 ? cg_err : -1)) < 0 ||
        set_item(d, NAME(cgroup_removed), PyBool_FromLong(r->cg_removed)) < 0 ||
        set_item(d, NAME(cgroup_kept), PyBool_FromLong(r->cg_kept)) < 0 ||
        set_item(d, NAME(cgroup_changed), PyBool_FromLong(r->cg_changed)) < 0 ||
        set_item(d, NAME(cgroup_cpu_some0),
                 int_or_none(r->cg_reused && r->have_started ? r->started.cg_some0_us : -1)) < 0 ||
        set_item(d, NAME(leaks), leaks_tuple(r)) < 0 ||
        set_item(d, NAME(leak_count), PyLong_FromLong(r->final.leak_count)) < 0 ||
        set_item(d, NAME(memory_peak_bytes), int_or_none(in_cgroup ? r->final.cg_memory_peak : -1)) < 0 ||
        set_item(d, NAME(pids_peak), int_or_none(in_cgroup ? r->final.cg_pids_peak : -1)) < 0 ||
        set_item(d, NAME(cgroup_oom_kill),
                 int_or_none(in_cgroup && r->have_final ? r->final.cg_oom_kill : -1)) < 0 ||
        set_item(d, NAME(cgroup_oom_group_kill),
                 int_or_none(in_cgroup && r->have_final ? r->final.cg_oom_group_kill : -1)) < 0 ||
        set_item(d, NAME(evidence), evidence_tuple(r)) < 0 ||
        set_item(d, NAME(prepared), r->prepare_tried ? PyLong_FromLong(r->prepare_errno)
                                                 : (Py_INCREF(Py_None), Py_None)) < 0) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}

/* Convert seconds (float, < 0 meaning none) to nanoseconds, saturating. */
static int64_t seconds_to_ns(double s)
{
    if (s < 0)
        return -1;
    if (s >= 1e9)  /* ~31 years: saturate so deadline + grace + slack cannot overflow */
        return (int64_t)1000000000 * NS_PER_S;
    return (int64_t)(s * 1e9);
}

/* pg_run's arguments that stay Python objects until copy_inputs. */
struct run_args {
    PyObject *shepherd, *argv, *envp, *cwd, *input, *cgroup, *prepare;
    long stop_signal;
    long cgroup_flags;  /* CGROUP_REQUIRED | CGROUP_KEEP | CGROUP_REUSED (proc_group.py) */
};

/* Check pg_run's arguments and fill the scalar settings of r. Return 0, or -1 with an
 * exception (TypeError, ValueError: programming errors of the caller, proc_group.py). */
static int parse_run_args(struct run *r, struct run_args *a, PyObject *const *args,
                          Py_ssize_t nargs)
{
    double timeout_s, grace_s;
    Py_ssize_t capture_limit;
    long tee_fd, pool;
    PyObject *on_output;

    if (nargs != 16) {
        PyErr_SetString(PyExc_TypeError, "run() takes exactly 16 arguments");
        return -1;
    }
    a->shepherd = args[0];
    a->argv = args[1];
    a->envp = args[2];
    a->cwd = args[3];
    a->input = args[4];
    on_output = args[8];
    a->cgroup = args[10];
    a->prepare = args[14];
    if ((a->cgroup != Py_None && !PyBytes_Check(a->cgroup)) || !PyBytes_Check(a->shepherd) ||
        (a->prepare != Py_None && !PyBytes_Check(a->prepare)) ||
        !PyList_Check(a->argv) || PyList_GET_SIZE(a->argv) < 1 ||
        (a->envp != Py_None && !PyList_Check(a->envp)) ||
        (a->cwd != Py_None && !PyBytes_Check(a->cwd)) ||
        (a->input != Py_None && !PyBytes_Check(a->input)) ||
        (on_output != Py_None && !PyCallable_Check(on_output))) {
        PyErr_SetString(PyExc_TypeError, "run(): bad argument types (use retest.proc_group.run)");
        return -1;
    }
    timeout_s = PyFloat_AsDouble(args[5]);
    grace_s = PyFloat_AsDouble(args[6]);
    /* Saturating: a limit beyond any buffer means "keep everything" (2**63 is not an error) */
    capture_limit = PyNumber_AsSsize_t(args[7], NULL);
    tee_fd = PyLong_AsLong(args[9]);
    a->cgroup_flags = PyLong_AsLong(args[11]);  /* a bool is 0 or CGROUP_REQUIRED */
    a->stop_signal = PyLong_AsLong(args[12]);
    r->evidence = PyObject_IsTrue(args[13]);
    pool = PyLong_AsLong(args[15]);
    r->pool_max = pool > PG_POOL_MAX ? PG_POOL_MAX : pool < 0 ? 0 : (int)pool;
    if (PyErr_Occurred())
        return -1;
    if (a->stop_signal < 1 || a->stop_signal >= NSIG) {
        PyErr_SetString(PyExc_ValueError, "run(): bad stop signal");
        return -1;
    }
    if (tee_fd < -1 || tee_fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "run(): bad tee fd");
        return -1;
    }
    if (capture_limit < 0 || grace_s < 0 || grace_s != grace_s || timeout_s != timeout_s) {
        PyErr_SetString(PyExc_ValueError, "run(): capture_limit, grace and timeout must be valid");
        return -1;
    }
    r->timeout_ns = seconds_to_ns(timeout_s);
    r->grace_ns = seconds_to_ns(grace_s);
    r->capture_limit = (size_t)capture_limit;
    r->tee_fd = (int)tee_fd;
    r->on_output = on_output == Py_None ? NULL : on_output;
    return 0;
}

/* Add the length of bytes object b, with its NUL, to *total. Return 0, or -1 with an exception
 * (TypeError, or ValueError for an embedded NUL). */
static int measure(PyObject *b, size_t *total)
{
    if (!PyBytes_Check(b)) {
        PyErr_SetString(PyExc_TypeError, "expected bytes");
        return -1;
    }
    if (memchr(PyBytes_AS_STRING(b), '\0', (size_t)PyBytes_GET_SIZE(b))) {
        PyErr_SetString(PyExc_ValueError, "embedded NUL byte");
        return -1;
    }
    *total += (size_t)PyBytes_GET_SIZE(b) + 1;
    return 0;
}

/* Copy n bytes and a NUL to p; return the end. */
static char *put(char *p, const char *s, size_t n)
{
    memcpy(p, s, n);
    p[n] = '\0';
    return p + n + 1;
}

/* Copy bytes object b and a NUL to p; return the end. */
static char *put_bytes(char *p, PyObject *b)
{
    return put(p, PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b));
}

/* Measure the request's payload (protocol.h) and count its environment. The process
 * environment is read while we hold the GIL: Python's os.environ writes (putenv) happen
 * under it, and the request is sent without it. Return 0, or -1 with an exception. */
static int measure_payload(const struct run_args *a, size_t *total, size_t *envc)
{
    Py_ssize_t argc = PyList_GET_SIZE(a->argv);
    *total = 0;
    *envc = 0;
    if ((a->cwd != Py_None && measure(a->cwd, total) < 0) ||
        (a->cgroup != Py_None && measure(a->cgroup, total) < 0))
        return -1;
    for (Py_ssize_t i = 0; i < argc; i++)
        if (measure(PyList_GET_ITEM(a->argv, i), total) < 0)
            return -1;
    if (a->envp != Py_None) {
        *envc = (size_t)PyList_GET_SIZE(a->envp);
        for (size_t i = 0; i < *envc; i++)
            if (measure(PyList_GET_ITEM(a->envp, (Py_ssize_t)i), total) < 0)
                return -1;
    } else {
        for (; environ && environ[*envc]; (*envc)++)
            *total += strlen(environ[*envc]) + 1;
    }
    if (*envc > INT32_MAX || (size_t)argc > INT32_MAX || *total > PG_REQ_MAX_PAYLOAD) {
        PyErr_SetString(PyExc_ValueError, "run(): command and environment too large");
        return -1;
    }
    return 0;
}

/* Build the run's request (protocol.h: struct pg_request and its payload) in r->req, with
 * pointers into it for our own messages. Return 0, or -1 with an exception. */
static int build_request(struct run *r, const struct run_args *a)
{
    size_t payload, envc;
    struct pg_request *h;
    char *p;
    Py_ssize_t argc = PyList_GET_SIZE(a->argv);

    if (measure_payload(a, &payload, &envc) < 0)
        return -1;
    r->req_len = sizeof(*h) + payload;
    if (!(r->req = PyMem_RawMalloc(r->req_len))) {
        PyErr_NoMemory();
        return -1;
    }
    h = (struct pg_request *)r->req;
    memset(h, 0, sizeof(*h));
    h->magic = PG_REQ_MAGIC;
    h->flags = (a->cgroup_flags & CGROUP_REQUIRED ? PG_REQ_CG_REQUIRED : 0) |
               (a->cgroup_flags & CGROUP_KEEP ? PG_REQ_CG_KEEP : 0) |
               (a->cgroup_flags & CGROUP_REUSED ? PG_REQ_CG_REUSED : 0);
    /* The deadline travels as an absolute CLOCK_MONOTONIC time: starting the shepherd and
     * the command is part of the run, and must not push the deadline back. */
    h->deadline_ns = r->timeout_ns < 0 ? -1 : r->start_ns + r->timeout_ns;
    h->grace_ns = r->grace_ns;
    h->stop_signal = (int32_t)a->stop_signal;
    h->has_cwd = a->cwd != Py_None;
    h->has_cgroup = a->cgroup != Py_None;
    h->argc = (int32_t)argc;
    h->envc = (int32_t)envc;
    h->pin_cpu = -1;  /* hand_over: a pooled shepherd is pinned to our CPU */
    h->payload_len = payload;
    p = r->req + sizeof(*h);
    if (h->has_cwd) {
        r->cwd = p;
        p = put_bytes(p, a->cwd);
    }
    if (h->has_cgroup) {
        r->cg_path = p;
        p = put_bytes(p, a->cgroup);
        r->cg_reused = (a->cgroup_flags & CGROUP_REUSED) != 0;
    }
    r->exec_name = p;
    for (Py_ssize_t i = 0; i < argc; i++)
        p = put_bytes(p, PyList_GET_ITEM(a->argv, i));
    r->env_start = p;
    for (size_t i = 0; i < envc; i++)
        p = a->envp != Py_None ? put_bytes(p, PyList_GET_ITEM(a->envp, (Py_ssize_t)i))
                               : put(p, environ[i], strlen(environ[i]));
    return 0;
}

/* Copy every input out of Python objects into r (the GIL is released while they are in use):
 * the request, the input bytes. Return 0, or -1 with an exception (MemoryError, embedded
 * NUL). */
static int copy_inputs(struct run *r, const struct run_args *a)
{
    if (!(r->shepherd_path = dup_bytes(a->shepherd)))
        return -1;
    if (a->prepare != Py_None && !(r->prepare_path = dup_bytes(a->prepare)))
        return -1;
    if (build_request(r, a) < 0)
        return -1;
    if (a->input != Py_None) {
        r->input_len = (size_t)PyBytes_GET_SIZE(a->input);
        r->input = PyMem_RawMalloc(r->input_len ? r->input_len : 1);
        if (!r->input) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy((char *)r->input, PyBytes_AS_STRING(a->input), r->input_len);
    }
    return 0;
}

/* The command's ends of its stdio, open in the caller until the shepherd has them. */
struct child_fds {
    int in_r, out_w, err_w;
    int cwd;               /* the caller's cwd (O_PATH), when the run has no cwd of its own */
};

/* Close the command's ends in the caller. */
static void close_child_fds(struct child_fds *cf)
{
    close_fd(&cf->in_r);
    close_fd(&cf->cwd);
    close_fd(&cf->out_w);
    close_fd(&cf->err_w);
}

/* Make the pipes: our ends in r, the command's in cf. All close-on-exec from birth: a
 * concurrent spawn from another thread must not inherit them, or our EOF would wait for an
 * unrelated process. Return 0 or an errno. */
static int open_run_fds(struct run *r, struct child_fds *cf)
{
    int pipes[2];
    if (pipe2(pipes, O_CLOEXEC) < 0)
        return errno;
    r->out_r = pipes[0];
    cf->out_w = pipes[1];
    if (pipe2(pipes, O_CLOEXEC) < 0)
        return errno;
    r->err_r = pipes[0];
    cf->err_w = pipes[1];
    if (r->input) {
        if (pipe2(pipes, O_CLOEXEC) < 0)
            return errno;
        cf->in_r = pipes[0];
        r->in_w = pipes[1];
    } else if ((cf->in_r = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0) {
        return errno;
    }
    if (fcntl(r->out_r, F_SETFL, O_NONBLOCK) < 0 || fcntl(r->err_r, F_SETFL, O_NONBLOCK) < 0 ||
        (r->in_w >= 0 && fcntl(r->in_w, F_SETFL, O_NONBLOCK) < 0))
        return errno;
    return 0;
}

/* The shepherd could not be started (EMFILE, EAGAIN under RLIMIT_NPROC, ENOMEM; or, broken
 * set, our own executable is missing or not runnable): a runtime fault, reported in the
 * result, never raised. Return the result dict, or NULL with an exception. */
static PyObject *spawn_failure_result(struct run *r, int err, int broken)
{
    close_fd(&r->out_r);
    close_fd(&r->err_r);
    close_fd(&r->in_w);
    hang_up(&r->shepherd.ctl);
    pg_shepherd_clear(&r->shepherd);  /* no shepherd started: no pidfd is held */
    r->have_spawn_failure = 1;
    r->spawn_failure.stage = broken ? PG_STAGE_SHEPHERD : PG_STAGE_SPAWN;
    r->spawn_failure.err = err;
    r->have_final = 1;
    r->final.wait_status = -1;
    r->end_ns = now_ns();
    if (r->cg_path) {
        r->cg_removed = cg_remove(r->cg_path) == 0;  /* the shepherd never ran: empty */
        r->cg_path_released = 1;
    }
    return build_result(r, broken ? r->shepherd_path : r->exec_name, "");
}

/* The closing reading (no GIL): the kernel log since the cursor, and the machine's counters;
 * /proc/vmstat only when the OOM killer may have been at work (a record in the log, or the
 * leader killed by a SIGKILL that was not the deadline's): the rest of the time its 25 us
 * would buy nothing (retest.oom uses its delta in those cases only). */
static void read_evidence_after(struct run *r)
{
    int st = r->have_final ? r->final.wait_status : -1;
    int sigkilled = st >= 0 && WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL && !r->final.timed_out;
    ev_kmsg_collect(&r->kmsg);
    ev_machine_read(&r->ev1, r->kmsg.n_kept > 0 || sigkilled);
}

/* The early reading (taken when the pipes closed) stands for the end when the run ended as
 * plainly as it can: the command exited by itself, nothing was left, nothing was killed.
 * Otherwise the tree's last moments came after it (a sweep, a kill, an OOM victim among the
 * leftovers) and the end is read again. */
static int early_evidence_stands(const struct run *r)
{
    const struct pg_record *f = &r->final;
    /* and soon enough before the end: a command may close its output and go on for hours */
    return r->early_evidence && r->end_ns - r->ev1.at_ns <= EARLY_EVIDENCE_MAX_NS &&
           r->have_final && !r->shepherd_lost && f->wait_status >= 0 &&
           WIFEXITED(f->wait_status) && !f->timed_out && !f->terminated && !f->escalated &&
           f->leak_count == 0 && f->swept_after_exit == 0 && f->unkillable == 0;
}

/* Hand the run to a shepherd (no GIL): an idle one started from the caller's state as it is
 * now (pool.c), else a new one; the request carries the command's stdio fds. A shepherd that
 * dies before it takes the request (EPIPE) is let go and the next one tried; a new one that
 * does is reported by pump() as lost. Return 0, or an errno if no shepherd could be started. */
static int hand_over(struct run *r, struct child_fds *cf)
{
    struct pg_request *h = (struct pg_request *)r->req;
    struct pg_shepherd idle;
    int err;

    r->have_fp = r->pool_max > 0 && pg_fingerprint(&r->fp) == 0;
    if (r->have_fp && !r->cwd) {
        /* the caller's cwd as it is now, not the one a shepherd was started in */
        cf->cwd = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
        r->have_fp = cf->cwd >= 0;  /* else a fresh shepherd inherits it, as always */
    }
    if (cf->cwd >= 0)
        h->flags |= PG_REQ_CWD_FD;
    if (!r->have_fp)
        h->flags |= PG_REQ_LAST;  /* nobody could use it afterwards: it exits after FINAL */
    /* A kept cgroup serves again only once the shepherd that kept it checked it whole. */
    if ((h->flags & PG_REQ_CG_REUSED) && r->cg_path && pg_pool_settle_cgroup(pg_path_key(r->cg_path))) {
        r->cg_changed = 1;
        return ESTALE;  /* its last command changed it: removed; nothing ran, take another */
    }
    while (r->have_fp && pg_pool_take(r->fp, &idle)) {
        if (pg_shepherd_settle(&idle) == 0) {
            /* after IDLE: its own check is done, with the mask it gave itself back */
            h->pin_cpu = r->alone ? pg_shepherd_pin(&idle) : -1;
            if (send_request(r, idle.ctl, cf->in_r, cf->out_w, cf->err_w, cf->cwd) == 0) {
                r->shepherd = idle;
                return 0;
            }
        }
        pg_pool_retire(&idle);
    }
    h->pin_cpu = -1;  /* a new shepherd takes our mask as its own at its start */
    err = spawn_shepherd(r);
    if (err)
        return err;
    if (r->have_fp) {
        /* Another thread may have changed the process's state (chdir, umask, setrlimit)
         * between the fingerprint and the spawn: then the new shepherd is not the one the
         * fingerprint describes, and must not be kept under it. */
        uint64_t again;
        if (pg_fingerprint(&again) < 0 || again != r->fp) {
            r->have_fp = 0;
            h->flags |= PG_REQ_LAST;
        }
    }
    if (send_request(r, r->shepherd.ctl, cf->in_r, cf->out_w, cf->err_w, cf->cwd))
        shutdown(r->shepherd.ctl, SHUT_WR);  /* part went: EOF ends its read; pump sees it lost */
    return 0;
}

/* While the shepherd starts the command (no GIL), which takes longer than these: the
 * evidence's first reading and the next run's cgroup. The caller would sleep in poll
 * meanwhile. */
static void while_it_starts(struct run *r)
{
    if (r->evidence) {
        /* Nothing of the command ran yet that the OOM killer could take (it must first exec
         * and allocate). */
        ev_kmsg_open(&r->kmsg);
        ev_machine_read(&r->ev0, 1);
        r->have_evidence = 1;
    }
    if (r->prepare_path) {  /* mkdir costs ~45 us under cgroup_mutex: not the next run's */
        r->prepare_errno = mkdir(r->prepare_path, 0777) == 0 ? 0 : errno;
        r->prepare_tried = 1;
    }
}

/* The runs of this process between their hand-over and their end. A shepherd is pinned to
 * its caller's CPU only for a run that has the process to itself (hand_over): with more at
 * once, both CPUs are busy anyway, and a pinned shepherd could not go where one is free. */
static int runs_in_flight;
static pthread_once_t flight_once = PTHREAD_ONCE_INIT;

/* A fork's child has none of its parent's other threads, so none of their runs. */
static void flight_after_fork_child(void)
{
    __atomic_store_n(&runs_in_flight, 0, __ATOMIC_RELAXED);
}

static void flight_register_fork_handler(void)
{
    pthread_atfork(NULL, NULL, flight_after_fork_child);
}

static void leave_flight(struct run *r)
{
    if (r->in_flight)
        __atomic_sub_fetch(&runs_in_flight, 1, __ATOMIC_RELAXED);
    r->in_flight = 0;
}

/* After the run (no GIL): the cgroup released, the closing evidence read (completed: no
 * exception is pending). In pump's GIL-free stretch: one GIL hand-back per run, not three
 * (with 8 threads, each taking the GIL back waits for whoever holds it). */
static void finish_run(struct run *r, int completed)
{
    leave_flight(r);
    pg_running_set(r->tid, 0);
    if (r->cg_path)
        r->cg_removed = release_cgroup(r);
    if (completed && r->have_evidence && !early_evidence_stands(r))
        read_evidence_after(r);
}

/* Before the run's poll loop (no GIL): hand it to a shepherd, and while it starts the
 * command, read what is due meanwhile. Return 0, or hand_over's errno. */
static int start_run(struct run *r, struct child_fds *cf)
{
    int err;
    pthread_once(&flight_once, flight_register_fork_handler);
    r->in_flight = 1;
    /* <= 0: a run that forked from its on_output callback leaves its child's count at -1 */
    r->alone = __atomic_fetch_add(&runs_in_flight, 1, __ATOMIC_RELAXED) <= 0;
    err = hand_over(r, cf);
    close_child_fds(cf);
    if (err) {
        leave_flight(r);
        return err;
    }
    r->tid = (pid_t)syscall(SYS_gettid);
    pg_running_set(r->tid, r->shepherd.pid);
    while_it_starts(r);
    if (r->in_w >= 0 && r->input_len == 0)
        close_fd(&r->in_w);
    return 0;
}

/* Start the run, stream it, collect the report. Return the result dict, or NULL with an
 * exception (from on_output, or KeyboardInterrupt: the tree is down by then). */
static PyObject *start_and_wait(struct run *r)
{
    struct child_fds cf = {-1, -1, -1, -1};
    int err = open_run_fds(r, &cf), rc;
    if (err) {
        close_child_fds(&cf);
        return spawn_failure_result(r, err, 0);
    }
    rc = pump(r, &cf, &err);  /* -1: an exception is pending; the cgroup was released */
    if (err)  /* ENOENT/EACCES/ENOEXEC: our shepherd executable is missing or broken */
        return spawn_failure_result(r, err, err == ENOENT || err == EACCES || err == ENOEXEC);
    r->cg_path_released = r->cg_path != NULL;
    if (rc < 0)
        return NULL;
    return build_result(r, r->exec_name, r->cwd ? r->cwd : "");
}

/* Free everything r owns (GIL held). */
static void free_run(struct run *r)
{
    if (r->cg_path && !r->cg_path_released)
        cg_remove(r->cg_path);  /* failed before the spawn (MemoryError): nothing is in it */
    ev_kmsg_free(&r->kmsg);
    tailpipe_close(&r->tail[0]);
    tailpipe_close(&r->tail[1]);
    capture_free(&r->cap[0]);
    capture_free(&r->cap[1]);
    PyMem_RawFree(r->scratch);
    PyMem_RawFree((char *)r->input);
    PyMem_RawFree(r->req);
    PyMem_RawFree(r->shepherd_path);
    PyMem_RawFree(r->prepare_path);
}

const char pg_run_doc[] =
    "run(shepherd, argv, envp, cwd, input, timeout_s, grace_s, capture_limit, on_output, tee_fd,"
    " cgroup, cgroup_flags, stop_signal, evidence, prepare, pool)"
    " -> dict\n\nPrivate: use retest.proc_group.run().";

/* run(...) -> dict of RunResult fields. Raises only for programming errors (TypeError,
 * ValueError, MemoryError) or an exception from on_output/KeyboardInterrupt, after the
 * tree is down. Runtime faults come back in the dict as spawn_error. */
PyObject *pg_run(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct run r;
    struct run_args a;
    pg_module_state *st = PyModule_GetState(module);
    PyObject *result = NULL;

    memset(&r, 0, sizeof(r));
    r.out_r = r.err_r = r.in_w = r.keep_ctl = r.tee_fd = -1;
    pg_shepherd_clear(&r.shepherd);
    r.names = st->names;
    if (parse_run_args(&r, &a, args, nargs) < 0)
        return NULL;
    capture_init(&r.cap[0], r.capture_limit);
    capture_init(&r.cap[1], r.capture_limit);
    tailpipe_init(&r.tail[0]);
    tailpipe_init(&r.tail[1]);
    r.start_ns = now_ns();
    if (copy_inputs(&r, &a) == 0)
        result = start_and_wait(&r);
    if (!result && r.prepare_tried && r.prepare_errno == 0)
        rmdir(r.prepare_path);  /* made ahead, but nobody will hear of it: not left behind */
    free_run(&r);
    return result;
}

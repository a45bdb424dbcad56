/* run(): the caller's side of the native runner.
 *
 * Starts the shepherd (shepherd.c) with posix_spawn, which glibc implements with
 * clone(CLONE_VM | CLONE_VFORK): no page tables are copied, so the cost is the same for a
 * 50 MB caller and a 5 GB one (fork() of a 500 MB Python process costs ~12 ms). Then,
 * with the GIL released, it polls the command's stdout and stderr and the shepherd's
 * report socket, keeping a bounded head and tail of each stream, teeing and calling the
 * output callback as bytes arrive, until both pipes reach EOF and the final report is in.
 *
 * The deadline itself is enforced by the shepherd (it is the tree's parent and
 * subreaper); the caller only asks it to terminate early (KeyboardInterrupt, a callback
 * that raised) and keeps a backstop in case the shepherd itself is stopped or lost.
 */
#include "proc_group.h"
#include "protocol.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define NS_PER_S 1000000000LL
#define READ_CHUNK (1 << 20)
#define PIPE_SIZE (1 << 20)
/* Poll at least this often so that Ctrl-C is seen even when the kernel delivered SIGINT
 * to another thread (Python's handler only flags it; our poll would not see EINTR). */
#define SIGNAL_CHECK_MS 200
/* Once the shepherd reported that the tree is gone, wait at most this long for EOF on the
 * output pipes (something outside the tree, handed our pipe via SCM_RIGHTS, may hold it). */
#define DRAIN_AFTER_FINAL_NS (NS_PER_S / 2)
/* The shepherd enforces the deadline; if it has not reported this long after deadline plus
 * grace (it was SIGSTOPped, or is stuck), the caller kills it and the group itself. */
#define BACKSTOP_SLACK_NS (15 * NS_PER_S)

static const char OMITTED_FMT[] = "\n[retest: %llu bytes omitted]\n";

/* ---------------------------------------------------------------- bounded capture */

struct capture {
    char *head;          /* first head_cap bytes, grown geometrically */
    size_t head_len, head_cap, head_alloc;
    char *ring;          /* last ring_cap bytes, allocated when the head is full */
    size_t ring_cap, ring_pos, ring_fill;
    unsigned long long total;
};

/* Set up a capture keeping at most limit bytes (half head, half tail). */
static void capture_init(struct capture *c, size_t limit)
{
    memset(c, 0, sizeof(*c));
    c->head_cap = limit / 2;
    c->ring_cap = limit - c->head_cap;
}

static void capture_free(struct capture *c)
{
    PyMem_RawFree(c->head);
    PyMem_RawFree(c->ring);
    c->head = c->ring = NULL;
}

/* Return where the next read should land and how much it may take, growing the head or
 * allocating the ring as needed; scratch is used when nothing is kept. NULL on ENOMEM. */
static char *capture_slot(struct capture *c, char *scratch, size_t *room)
{
    if (c->head_len < c->head_cap) {
        size_t want = c->head_len + READ_CHUNK;
        if (want > c->head_cap)
            want = c->head_cap;
        if (want > c->head_alloc) {
            size_t grow = c->head_alloc ? c->head_alloc * 2 : 64 * 1024;
            char *p;
            if (grow < want)
                grow = want;
            if (grow > c->head_cap)
                grow = c->head_cap;
            p = PyMem_RawRealloc(c->head, grow);
            if (!p)
                return NULL;
            c->head = p;
            c->head_alloc = grow;
        }
        *room = c->head_alloc - c->head_len;
        if (*room > READ_CHUNK)
            *room = READ_CHUNK;
        return c->head + c->head_len;
    }
    if (c->ring_cap == 0) {
        *room = READ_CHUNK;
        return scratch;
    }
    if (!c->ring) {
        c->ring = PyMem_RawMalloc(c->ring_cap);
        if (!c->ring)
            return NULL;
    }
    *room = c->ring_cap - c->ring_pos;
    if (*room > READ_CHUNK)
        *room = READ_CHUNK;
    return c->ring + c->ring_pos;
}

/* Account for n bytes just read into the slot returned by capture_slot. */
static void capture_commit(struct capture *c, size_t n)
{
    c->total += n;
    if (c->head_len < c->head_cap) {
        c->head_len += n;
        return;
    }
    if (c->ring_cap == 0)
        return;
    c->ring_pos += n;
    if (c->ring_fill < c->ring_cap) {
        c->ring_fill += n;
        if (c->ring_fill > c->ring_cap)
            c->ring_fill = c->ring_cap;
    }
    if (c->ring_pos == c->ring_cap)
        c->ring_pos = 0;
}

/* Return the kept bytes as a new bytes object: head, a marker with the count of bytes
 * left out when there were any, then the tail in order. Sets *dropped. */
static PyObject *capture_bytes(struct capture *c, unsigned long long *dropped)
{
    char marker[96];
    size_t marker_len = 0, size;
    PyObject *out;
    char *p;

    *dropped = c->total - c->head_len - c->ring_fill;
    if (*dropped)
        marker_len = (size_t)snprintf(marker, sizeof(marker), OMITTED_FMT, *dropped);
    size = c->head_len + marker_len + c->ring_fill;
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (!out)
        return NULL;
    p = PyBytes_AS_STRING(out);
    if (c->head_len)
        memcpy(p, c->head, c->head_len);
    p += c->head_len;
    memcpy(p, marker, marker_len);
    p += marker_len;
    if (c->ring_fill < c->ring_cap || c->ring_pos == 0) {
        /* never wrapped (or wrapped exactly at the end): the tail is in order */
        if (c->ring_fill)
            memcpy(p, c->ring, c->ring_fill);
    } else {
        size_t older = c->ring_cap - c->ring_pos;
        memcpy(p, c->ring + c->ring_pos, older);
        memcpy(p + older, c->ring, c->ring_pos);
    }
    return out;
}

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

/* Write to a tee fd, best effort: a full disk must not fail the run. Return 0 or errno. */
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
    char **shepherd_argv;
    char **envp;
    const char *input;
    size_t input_len, input_off;
    int64_t timeout_ns, grace_ns;
    size_t capture_limit;
    int tee_fd;
    PyObject *on_output;   /* borrowed */
    PyObject *names[2];    /* borrowed from module state */

    /* fds: ours to close */
    int out_r, err_r, in_w, ctl;
    pid_t shepherd;

    struct capture cap[2];
    char *scratch;

    /* the report */
    struct pg_record rec_buf;
    size_t rec_got;
    int have_started, have_final, have_spawn_failure;
    struct pg_record started, final, spawn_failure;
    int tee_errno;
    int terminate_sent;
    int shepherd_lost;
    int shepherd_status;
    int64_t start_ns, end_ns;
};

/* Free every C copy of the inputs. */
static void free_strv(char **v)
{
    if (!v)
        return;
    for (char **p = v; *p; p++)
        PyMem_RawFree(*p);
    PyMem_RawFree(v);
}

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

/* Build a NULL-terminated vector: prefix strings (copied) then the items of list. */
static char **build_strv(const char *const *prefix, size_t nprefix, PyObject *list)
{
    Py_ssize_t n = PyList_GET_SIZE(list);
    char **v = PyMem_RawCalloc((size_t)n + nprefix + 1, sizeof(char *));
    if (!v) {
        PyErr_NoMemory();
        return NULL;
    }
    for (size_t i = 0; i < nprefix; i++) {
        size_t len = strlen(prefix[i]);
        v[i] = PyMem_RawMalloc(len + 1);
        if (!v[i]) {
            PyErr_NoMemory();
            free_strv(v);
            return NULL;
        }
        memcpy(v[i], prefix[i], len + 1);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        v[nprefix + (size_t)i] = dup_bytes(PyList_GET_ITEM(list, i));
        if (!v[nprefix + (size_t)i]) {
            free_strv(v);
            return NULL;
        }
    }
    return v;
}

/* Start the shepherd with our pipe ends as its fds 0..3. Return 0 or an errno. */
static int spawn_shepherd(struct run *r, int in_r, int out_w, int err_w, int ctl_child)
{
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t attr;
    sigset_t all, none;
    short flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF;
    int rc;

    rc = posix_spawn_file_actions_init(&fa);
    if (rc)
        return rc;
    rc = posix_spawnattr_init(&attr);
    if (rc) {
        posix_spawn_file_actions_destroy(&fa);
        return rc;
    }
    /* Our ends are all > 3 (raise_fd) and close-on-exec; dup2 clears the flag on the copy. */
    if ((rc = posix_spawn_file_actions_adddup2(&fa, in_r, 0)) ||
        (rc = posix_spawn_file_actions_adddup2(&fa, out_w, 1)) ||
        (rc = posix_spawn_file_actions_adddup2(&fa, err_w, 2)) ||
        (rc = posix_spawn_file_actions_adddup2(&fa, ctl_child, PG_CONTROL_FD)))
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
    rc = posix_spawn(&r->shepherd, r->shepherd_argv[0], &fa, &attr, r->shepherd_argv,
                     r->envp ? r->envp : environ);
cleanup:
    posix_spawnattr_destroy(&attr);
    posix_spawn_file_actions_destroy(&fa);
    return rc;
}

/* Ask the shepherd to take the tree down now (idempotent). */
static void send_terminate(struct run *r)
{
    char cmd = PG_CMD_TERMINATE;
    if (r->terminate_sent || r->ctl < 0)
        return;
    r->terminate_sent = 1;
    while (send(r->ctl, &cmd, 1, MSG_NOSIGNAL | MSG_DONTWAIT) < 0 && errno == EINTR)
        ;
}

/* Take in whatever the shepherd sent; mark the socket closed at EOF. */
static void read_reports(struct run *r)
{
    for (;;) {
        ssize_t n = recv(r->ctl, (char *)&r->rec_buf + r->rec_got, sizeof(r->rec_buf) - r->rec_got,
                         MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            close_fd(&r->ctl);  /* ECONNRESET: treat as EOF */
            if (!r->have_final) {
                r->shepherd_lost = 1;
                if (r->have_started)
                    kill(-r->started.pid, SIGKILL);
            }
            return;
        }
        if (n == 0) {
            close_fd(&r->ctl);
            if (!r->have_final) {
                /* The shepherd died before the tree did (someone SIGKILLed it). PDEATHSIG took
                 * the leader; the rest of its group is ours to kill. Escapees that left the
                 * group are out of our reach: documented in docs/internals.md. */
                r->shepherd_lost = 1;
                if (r->have_started)
                    kill(-r->started.pid, SIGKILL);
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
            r->final = r->rec_buf;
            r->have_final = 1;
            break;
        default:
            break;
        }
    }
}

/* Read once from stream i (0 stdout, 1 stderr) into its capture; tee it. Return the number
 * of bytes read (their start in *chunk), 0 at EOF/error (fd closed), -1 on EAGAIN. */
static ssize_t read_stream(struct run *r, int i, int *fd, const char **chunk)
{
    size_t room;
    char *slot = capture_slot(&r->cap[i], r->scratch, &room);
    ssize_t n;
    if (!slot) {
        /* No memory for the capture: keep draining (the child must not block), keep nothing. */
        slot = r->scratch;
        room = READ_CHUNK;
    }
    do {
        n = read(*fd, slot, room);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return -1;
    if (n <= 0) {
        close_fd(fd);
        return 0;
    }
    if (slot == r->scratch)
        r->cap[i].total += (size_t)n;
    else
        capture_commit(&r->cap[i], (size_t)n);
    if (r->tee_fd >= 0 && !r->tee_errno)
        r->tee_errno = tee_write(r->tee_fd, slot, (size_t)n);
    *chunk = slot;
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

/* Wait for the shepherd to exit and record how. The caller has closed its socket end. */
static void reap_shepherd(struct run *r)
{
    int status = 0;
    pid_t got;
    do {
        got = waitpid(r->shepherd, &status, 0);
    } while (got < 0 && errno == EINTR);
    r->shepherd_status = got == r->shepherd ? status : -1;
    r->shepherd = -1;
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

/* The poll loop. Entered and left with the GIL held; releases it while waiting and
 * reading. Return 0, or -1 with a pending exception (already handled: the tree is down). */
static int pump(struct run *r)
{
    PyThreadState *ts;
    PyObject *exc_type = NULL, *exc_value = NULL, *exc_tb = NULL;
    int64_t backstop_ns = -1, drain_deadline_ns = -1, last_signal_check_ns = now_ns();

    if (r->timeout_ns >= 0)
        backstop_ns = r->start_ns + r->timeout_ns + r->grace_ns + BACKSTOP_SLACK_NS;

    ts = PyEval_SaveThread();
    while (r->out_r >= 0 || r->err_r >= 0 || r->ctl >= 0) {
        struct pollfd fds[4];
        int nfds = 0, idx_out = -1, idx_err = -1, idx_ctl = -1, idx_in = -1, ready, timeout_ms;
        int64_t now = now_ns();

        if ((r->have_final || r->shepherd_lost) && r->ctl < 0) {
            if (drain_deadline_ns < 0)
                drain_deadline_ns = now + DRAIN_AFTER_FINAL_NS;
            else if (now >= drain_deadline_ns)
                break;  /* a holder outside the tree keeps the pipe open: stop waiting */
        }
        if (backstop_ns >= 0 && now >= backstop_ns && !r->have_final && r->shepherd > 0) {
            /* The shepherd is stuck or stopped: kill it; PDEATHSIG takes the leader down. */
            kill(r->shepherd, SIGKILL);
            if (r->have_started)
                kill(-r->started.pid, SIGKILL);
            r->shepherd_lost = 1;
            backstop_ns = -1;
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
        if (r->ctl >= 0) {
            idx_ctl = nfds;
            fds[nfds].fd = r->ctl;
            fds[nfds++].events = POLLIN;
        }
        if (r->in_w >= 0) {
            idx_in = nfds;
            fds[nfds].fd = r->in_w;
            fds[nfds++].events = POLLOUT;
        }
        timeout_ms = SIGNAL_CHECK_MS;
        if (drain_deadline_ns >= 0)
            timeout_ms = (int)((drain_deadline_ns - now) / 1000000) + 1;
        else if (backstop_ns >= 0 && (backstop_ns - now) / 1000000 < timeout_ms)
            timeout_ms = (int)((backstop_ns - now) / 1000000) + 1;
        ready = poll(fds, (nfds_t)nfds, timeout_ms);
        if (ready < 0 && errno != EINTR) {
            /* EINVAL/ENOMEM: nothing sensible to wait on; take the tree down and finish. */
            send_terminate(r);
            r->shepherd_lost = 1;
            break;
        }
        if ((ready <= 0 || now_ns() - last_signal_check_ns >= SIGNAL_CHECK_MS * 1000000LL) &&
            !exc_type && !r->terminate_sent) {
            /* Also on a busy stream: output that never lets poll time out must not hide Ctrl-C. */
            PyEval_RestoreThread(ts);
            if (PyErr_CheckSignals() < 0) {
                PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
                send_terminate(r);
            }
            ts = PyEval_SaveThread();
            last_signal_check_ns = now_ns();
        }
        if (ready <= 0)
            continue;
        if (idx_ctl >= 0 && fds[idx_ctl].revents)
            read_reports(r);
        if (idx_in >= 0 && fds[idx_in].revents)
            write_input(r);
        for (int s = 0; s < 2; s++) {
            int idx = s == 0 ? idx_out : idx_err;
            int *fd = s == 0 ? &r->out_r : &r->err_r;
            const char *chunk;
            ssize_t n;
            if (idx < 0 || !fds[idx].revents || *fd < 0)
                continue;
            n = read_stream(r, s, fd, &chunk);
            if (n > 0 && r->on_output && !exc_type) {
                PyEval_RestoreThread(ts);
                if (call_on_output(r, s, chunk, n) < 0) {
                    PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
                    send_terminate(r);
                }
                ts = PyEval_SaveThread();
            }
        }
    }
    close_fd(&r->in_w);
    close_fd(&r->ctl);
    close_fd(&r->out_r);
    close_fd(&r->err_r);
    if (r->shepherd > 0)
        reap_shepherd(r);
    r->end_ns = now_ns();
    PyEval_RestoreThread(ts);
    if (exc_type) {
        PyErr_Restore(exc_type, exc_value, exc_tb);
        return -1;
    }
    return 0;
}

static const char *stage_name(int stage)
{
    switch (stage) {
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

/* Set d[key] = value, stealing the reference to value. Return 0 or -1. */
static int set_item(PyObject *d, const char *key, PyObject *value)
{
    int rc;
    if (!value)
        return -1;
    rc = PyDict_SetItemString(d, key, value);
    Py_DECREF(value);
    return rc;
}

/* Build the result dict (the keyword arguments of RunResult minus args/backend). */
static PyObject *build_result(struct run *r, const char *exec_arg, const char *cwd_arg)
{
    PyObject *d = PyDict_New(), *spawn_error = Py_None, *spawn_errno = Py_None, *rc = Py_None;
    unsigned long long dropped[2];
    int failed = 0;
    if (!d)
        return NULL;
    Py_INCREF(Py_None);
    Py_INCREF(Py_None);
    Py_INCREF(Py_None);

    if (r->have_spawn_failure) {
        const char *what = r->spawn_failure.stage == PG_STAGE_CHDIR ? cwd_arg : exec_arg;
        PyObject *path = PyUnicode_DecodeFSDefault(what);
        Py_DECREF(spawn_error);
        Py_DECREF(spawn_errno);
        spawn_error = path ? PyUnicode_FromFormat("%s %R: %s", stage_name(r->spawn_failure.stage),
                                                  path, strerror(r->spawn_failure.err))
                           : NULL;
        Py_XDECREF(path);
        spawn_errno = PyLong_FromLong(r->spawn_failure.err);
        if (!spawn_error || !spawn_errno)
            failed = 1;
    } else if (!r->have_final || r->shepherd_lost) {
        Py_DECREF(spawn_error);
        if (WIFSIGNALED(r->shepherd_status))
            spawn_error = PyUnicode_FromFormat("retest shepherd lost: killed by signal %d",
                                               WTERMSIG(r->shepherd_status));
        else
            spawn_error = PyUnicode_FromFormat("retest shepherd lost (status %d)", r->shepherd_status);
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
    if (set_item(d, "returncode", rc) < 0 || set_item(d, "spawn_error", spawn_error) < 0 ||
        set_item(d, "spawn_errno", spawn_errno) < 0 ||
        set_item(d, "stdout", capture_bytes(&r->cap[0], &dropped[0])) < 0 ||
        set_item(d, "stderr", capture_bytes(&r->cap[1], &dropped[1])) < 0 ||
        set_item(d, "stdout_dropped", PyLong_FromUnsignedLongLong(dropped[0])) < 0 ||
        set_item(d, "stderr_dropped", PyLong_FromUnsignedLongLong(dropped[1])) < 0 ||
        set_item(d, "timed_out", PyBool_FromLong(r->final.timed_out)) < 0 ||
        set_item(d, "escalated", PyBool_FromLong(r->final.escalated)) < 0 ||
        set_item(d, "killed_at_deadline", PyLong_FromLong(r->final.killed_at_deadline)) < 0 ||
        set_item(d, "swept_after_exit", PyLong_FromLong(r->final.swept_after_exit)) < 0 ||
        set_item(d, "pid", r->have_started ? PyLong_FromLong(r->started.pid) : (Py_INCREF(Py_None), Py_None)) < 0 ||
        set_item(d, "duration_s", PyFloat_FromDouble((double)(r->end_ns - r->start_ns) / 1e9)) < 0 ||
        set_item(d, "user_cpu_s", PyFloat_FromDouble((double)r->final.utime_us / 1e6)) < 0 ||
        set_item(d, "sys_cpu_s", PyFloat_FromDouble((double)r->final.stime_us / 1e6)) < 0 ||
        set_item(d, "max_rss_kb", PyLong_FromLongLong(r->final.maxrss_kb)) < 0) {
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
    if (s >= 9.2e9)
        return INT64_MAX / 4;
    return (int64_t)(s * 1e9);
}

const char pg_run_doc[] =
    "run(shepherd, argv, envp, cwd, input, timeout_s, grace_s, capture_limit, on_output, tee_fd)"
    " -> dict\n\nPrivate: use retest.proc_group.run().";

/* run(...) -> dict of RunResult fields. Raises only for programming errors (TypeError,
 * ValueError, MemoryError) or an exception from on_output/KeyboardInterrupt, after the
 * tree is down. Runtime faults come back in the dict as spawn_error. */
PyObject *pg_run(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct run r;
    PyObject *shepherd_b, *argv_l, *envp_o, *cwd_o, *input_o, *on_output, *result = NULL;
    double timeout_s, grace_s;
    Py_ssize_t capture_limit;
    long tee_fd_l;
    int tee_fd, rc;
    int in_r = -1, out_w = -1, err_w = -1, pipes[2], sv[2];
    char nbuf[2][32], *cwd_arg = NULL, *shepherd_path = NULL;
    const char *prefix[4];
    PyObject **names = (PyObject **)PyModule_GetState(module);

    memset(&r, 0, sizeof(r));
    r.out_r = r.err_r = r.in_w = r.ctl = r.tee_fd = -1;
    r.shepherd = -1;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "run() takes exactly 10 arguments");
        return NULL;
    }
    shepherd_b = args[0];
    argv_l = args[1];
    envp_o = args[2];
    cwd_o = args[3];
    input_o = args[4];
    on_output = args[8];
    if (!PyBytes_Check(shepherd_b) || !PyList_Check(argv_l) || PyList_GET_SIZE(argv_l) < 1 ||
        (envp_o != Py_None && !PyList_Check(envp_o)) || (cwd_o != Py_None && !PyBytes_Check(cwd_o)) ||
        (input_o != Py_None && !PyBytes_Check(input_o)) ||
        (on_output != Py_None && !PyCallable_Check(on_output))) {
        PyErr_SetString(PyExc_TypeError, "run(): bad argument types (use retest.proc_group.run)");
        return NULL;
    }
    timeout_s = PyFloat_AsDouble(args[5]);
    grace_s = PyFloat_AsDouble(args[6]);
    capture_limit = PyLong_AsSsize_t(args[7]);
    tee_fd_l = PyLong_AsLong(args[9]);
    if (PyErr_Occurred())
        return NULL;
    if (tee_fd_l < -1 || tee_fd_l > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "run(): bad tee fd");
        return NULL;
    }
    tee_fd = (int)tee_fd_l;
    if (capture_limit < 0 || grace_s < 0 || grace_s != grace_s || timeout_s != timeout_s) {
        PyErr_SetString(PyExc_ValueError, "run(): capture_limit, grace and timeout must be valid");
        return NULL;
    }
    r.timeout_ns = seconds_to_ns(timeout_s);
    r.grace_ns = seconds_to_ns(grace_s);
    r.capture_limit = (size_t)capture_limit;
    r.tee_fd = tee_fd;
    r.on_output = on_output == Py_None ? NULL : on_output;
    r.names[0] = names[0];
    r.names[1] = names[1];

    /* Copy every input out of Python objects: the GIL is released while they are in use. */
    snprintf(nbuf[0], sizeof(nbuf[0]), "%lld", (long long)r.timeout_ns);
    snprintf(nbuf[1], sizeof(nbuf[1]), "%lld", (long long)r.grace_ns);
    if (!(shepherd_path = dup_bytes(shepherd_b)))
        goto cleanup;
    if (cwd_o != Py_None) {
        char *c = dup_bytes(cwd_o);
        size_t len;
        if (!c)
            goto cleanup;
        len = strlen(c);
        cwd_arg = PyMem_RawMalloc(len + 2);
        if (!cwd_arg) {
            PyMem_RawFree(c);
            PyErr_NoMemory();
            goto cleanup;
        }
        cwd_arg[0] = 'C';
        memcpy(cwd_arg + 1, c, len + 1);
        PyMem_RawFree(c);
    }
    prefix[0] = shepherd_path;
    prefix[1] = nbuf[0];
    prefix[2] = nbuf[1];
    prefix[3] = cwd_arg ? cwd_arg : "-";
    if (!(r.shepherd_argv = build_strv(prefix, 4, argv_l)))
        goto cleanup;
    if (envp_o != Py_None && !(r.envp = build_strv(NULL, 0, envp_o)))
        goto cleanup;
    if (input_o != Py_None) {
        r.input_len = (size_t)PyBytes_GET_SIZE(input_o);
        r.input = PyMem_RawMalloc(r.input_len ? r.input_len : 1);
        if (!r.input) {
            PyErr_NoMemory();
            goto cleanup;
        }
        memcpy((char *)r.input, PyBytes_AS_STRING(input_o), r.input_len);
    }
    r.scratch = PyMem_RawMalloc(READ_CHUNK);
    if (!r.scratch) {
        PyErr_NoMemory();
        goto cleanup;
    }
    capture_init(&r.cap[0], r.capture_limit);
    capture_init(&r.cap[1], r.capture_limit);

    r.start_ns = now_ns();
    /* All fds close-on-exec from birth: a concurrent spawn from another thread must not
     * inherit them, or our EOF would wait for an unrelated process. */
    rc = 0;
    if (pipe2(pipes, O_CLOEXEC) < 0)
        goto spawn_errno;
    r.out_r = pipes[0];
    out_w = pipes[1];
    if (pipe2(pipes, O_CLOEXEC) < 0)
        goto spawn_errno;
    r.err_r = pipes[0];
    err_w = pipes[1];
    if (r.input) {
        if (pipe2(pipes, O_CLOEXEC) < 0)
            goto spawn_errno;
        in_r = pipes[0];
        r.in_w = pipes[1];
    } else if ((in_r = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0) {
        goto spawn_errno;
    }
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        goto spawn_errno;
    r.ctl = sv[0];
    if (raise_fd(&in_r) || raise_fd(&out_w) || raise_fd(&err_w) || raise_fd(&sv[1]) ||
        raise_fd(&r.out_r) || raise_fd(&r.err_r) || raise_fd(&r.ctl) ||
        (r.in_w >= 0 && raise_fd(&r.in_w))) {
        close(sv[1]);
        goto spawn_errno;
    }
    /* Bigger pipes: fewer wake-ups and copies for chatty suites (best effort). */
    fcntl(r.out_r, F_SETPIPE_SZ, PIPE_SIZE);
    fcntl(r.err_r, F_SETPIPE_SZ, PIPE_SIZE);
    if (fcntl(r.out_r, F_SETFL, O_NONBLOCK) < 0 || fcntl(r.err_r, F_SETFL, O_NONBLOCK) < 0 ||
        (r.in_w >= 0 && fcntl(r.in_w, F_SETFL, O_NONBLOCK) < 0)) {
        close(sv[1]);
        goto spawn_errno;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = spawn_shepherd(&r, in_r, out_w, err_w, sv[1]);
    Py_END_ALLOW_THREADS
    close(sv[1]);
    close_fd(&in_r);
    close_fd(&out_w);
    close_fd(&err_w);
    if (rc) {
        r.shepherd = -1;
        errno = rc;
        goto spawn_errno;
    }
    if (r.in_w >= 0 && r.input_len == 0)
        close_fd(&r.in_w);
    if (pump(&r) < 0)
        goto cleanup;
    result = build_result(&r, r.shepherd_argv[4], cwd_arg ? cwd_arg + 1 : "");
    goto cleanup;

spawn_errno:
    /* The shepherd could not be started (EMFILE, EAGAIN under RLIMIT_NPROC, ENOMEM...):
     * a runtime fault, reported in the result, never raised. */
    {
        int err = errno;
        close_fd(&in_r);
        close_fd(&out_w);
        close_fd(&err_w);
        close_fd(&r.out_r);
        close_fd(&r.err_r);
        close_fd(&r.in_w);
        close_fd(&r.ctl);
        r.have_spawn_failure = 1;
        r.spawn_failure.stage = PG_STAGE_SPAWN;
        r.spawn_failure.err = err;
        r.have_final = 1;
        r.final.wait_status = -1;
        r.end_ns = now_ns();
        result = build_result(&r, r.shepherd_argv[4], "");
    }
cleanup:
    capture_free(&r.cap[0]);
    capture_free(&r.cap[1]);
    PyMem_RawFree(r.scratch);
    PyMem_RawFree((char *)r.input);
    free_strv(r.shepherd_argv);
    free_strv(r.envp);
    PyMem_RawFree(cwd_arg);
    PyMem_RawFree(shepherd_path);
    return result;
}

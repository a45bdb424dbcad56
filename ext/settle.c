/* settle.c: the shepherd's VERDICT after FINAL, taken when the caller is done (settle.h). */
#define _GNU_SOURCE
#include "settle.h"

#include "cgroup.h"
#include "pool.h"
#include "protocol.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* The checks take ~100 us; a shepherd silent this long is stopped or stuck. */
#define VERDICT_WAIT_MS 2000

static const char CAPSULE_NAME[] = "retest._proc_group.pending";

#if PY_VERSION_HEX >= 0x030D0000
#define IS_FINALIZING() Py_IsFinalizing()
#else
#define IS_FINALIZING() _Py_IsFinalizing()
#endif

struct pg_pending {
    struct pg_shepherd sh;  /* its socket open, the VERDICT unread */
    uint64_t fp;
    int may_pool, pool_max;
    char *cg_path;          /* PyMem_RawMalloc'd, or NULL */
    int settled, kept, removed;
};

/* Read the VERDICT record from ctl. Return 0, or -1 if none came (EOF, an error, silence for
 * VERDICT_WAIT_MS, or another record). */
static int read_verdict(int ctl, struct pg_record *v)
{
    size_t got = 0;
    while (got < sizeof(*v)) {
        struct pollfd p = {ctl, POLLIN, 0};
        ssize_t n;
        int rc = poll(&p, 1, VERDICT_WAIT_MS);
        if (rc < 0 && errno == EINTR)
            continue;
        if (rc <= 0)
            return -1;
        n = recv(ctl, (char *)v + got, sizeof(*v) - got, MSG_DONTWAIT);
        if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
            continue;
        if (n <= 0)
            return -1;
        got += (size_t)n;
    }
    return v->kind == PG_REC_VERDICT ? 0 : -1;
}

/* Take the VERDICT and act on it (no GIL). */
static void settle_now(struct pg_pending *p)
{
    struct pg_record v;
    int heard = read_verdict(p->sh.ctl, &v) == 0;
    if (heard && v.reusable && p->may_pool) {
        pg_pool_give(p->fp, &p->sh, p->pool_max);
        pg_shepherd_clear(&p->sh);  /* its fds are the pool's now */
    } else {
        if (!heard)  /* FINAL said the tree is gone: only the shepherd itself is stuck */
            pg_shepherd_signal(&p->sh, SIGKILL);
        pg_pool_retire(&p->sh);  /* hang up and reap it */
    }
    if (p->cg_path) {
        if (heard && v.cgroup_kept)
            p->kept = 1;
        else  /* empty (FINAL came after the tree): removed by the shepherd, else by us */
            p->removed = (heard && v.cgroup_removed) || cg_remove(p->cg_path) == 0;
    }
    p->settled = 1;
}

static void pending_free(struct pg_pending *p)
{
    PyMem_RawFree(p->cg_path);
    PyMem_RawFree(p);
}

static void pending_destroy(PyObject *capsule)
{
    struct pg_pending *p = PyCapsule_GetPointer(capsule, CAPSULE_NAME);
    if (!p)
        return;
    if (!p->settled) {
        if (IS_FINALIZING()) {  /* no waiting now: on EOF it exits (and removes a candidate) */
            pg_shepherd_close_pidfd(&p->sh);
            if (p->sh.ctl >= 0)
                close(p->sh.ctl);
        } else {
            Py_BEGIN_ALLOW_THREADS
            settle_now(p);
            if (p->kept)
                cg_remove(p->cg_path);  /* nobody will give it back to the spares */
            Py_END_ALLOW_THREADS
        }
    }
    pending_free(p);
}

PyObject *pg_pending_new(const struct pg_shepherd *sh, uint64_t fp, int may_pool, int pool_max,
                         const char *cg_path)
{
    struct pg_pending *p = PyMem_RawCalloc(1, sizeof(*p));
    PyObject *capsule;
    size_t n = cg_path ? strlen(cg_path) + 1 : 0;
    if (p && n && (p->cg_path = PyMem_RawMalloc(n)))
        memcpy(p->cg_path, cg_path, n);
    if (!p || (n && !p->cg_path)) {
        struct pg_shepherd copy = *sh;
        if (p)
            pending_free(p);
        pg_pool_retire(&copy);
        return PyErr_NoMemory();
    }
    p->sh = *sh;
    p->fp = fp;
    p->may_pool = may_pool;
    p->pool_max = pool_max;
    capsule = PyCapsule_New(p, CAPSULE_NAME, pending_destroy);
    if (!capsule) {
        pg_pool_retire(&p->sh);
        pending_free(p);
    }
    return capsule;
}

const char pg_settle_doc[] =
    "settle(token) -> (cgroup_kept, cgroup_removed)\n\n"
    "Take the shepherd's verdict on a finished run (private: retest.proc_group).";

PyObject *pg_settle(PyObject *module, PyObject *token)
{
    struct pg_pending *p = PyCapsule_GetPointer(token, CAPSULE_NAME);
    if (!p)
        return NULL;
    if (!p->settled) {
        Py_BEGIN_ALLOW_THREADS
        settle_now(p);
        Py_END_ALLOW_THREADS
    }
    return Py_BuildValue("(OO)", p->kept ? Py_True : Py_False, p->removed ? Py_True : Py_False);
}

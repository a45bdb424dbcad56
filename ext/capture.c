/* capture.c: the bounded capture of a stream, built in place in its result (capture.h). */
#include "capture.h"

#include <stdio.h>
#include <string.h>

/* Room kept between the head and the ring for the marker (the longest fits: 47 bytes). */
#define MARKER_MAX 64
/* The first allocation; the head then doubles up to its cap. */
#define FIRST_ALLOC (64 * 1024)
/* A ring smaller than this is filled through the scratch buffer: direct reads into a tiny
 * ring would turn a chatty command into millions of tiny reads (and callbacks). */
#define DIRECT_RING_MIN (256 * 1024)

static const char OMITTED_FMT[] = "\n[retest: %llu bytes omitted]\n";

void capture_init(struct capture *c, size_t limit)
{
    memset(c, 0, sizeof(*c));
    c->head_cap = limit / 2;
    c->ring_cap = limit - c->head_cap;
}

void capture_free(struct capture *c)
{
    Py_CLEAR(c->buf);
}

/* Give buf size bytes (creating it, or resizing it: realloc, which moves big blocks with
 * mremap rather than copying them), taking the GIL for it. Return 0, or -1 with the capture
 * marked lost (its bytes are counted as dropped, never raised: a run does not fail for it). */
static int capture_resize(struct capture *c, size_t size, PyThreadState **ts)
{
    int failed;
    if (size > (size_t)PY_SSIZE_T_MAX) {
        c->lost = 1;
        return -1;
    }
    PyEval_RestoreThread(*ts);
    if (!c->buf)
        c->buf = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    else
        _PyBytes_Resize(&c->buf, (Py_ssize_t)size);  /* on failure: freed, set to NULL */
    failed = c->buf == NULL;
    if (failed) {
        PyErr_Clear();
        c->lost = 1;
        c->head_len = c->ring_fill = c->ring_pos = 0;
    }
    *ts = PyEval_SaveThread();
    return failed ? -1 : 0;
}

/* Make room in the head for want more bytes: double it, up to its cap; at the cap, the
 * ring's part too in the same step. Return 0 or -1 (lost). */
static int grow_head(struct capture *c, size_t want, PyThreadState **ts)
{
    size_t head = c->head_alloc ? c->head_alloc * 2 : FIRST_ALLOC, size;
    if (head < c->head_len + want)
        head = c->head_len + want;
    if (head >= c->head_cap)
        head = c->head_cap;
    size = head + MARKER_MAX;
    if (head == c->head_cap && c->ring_cap > 0)
        size += c->ring_cap;
    if (capture_resize(c, size, ts) < 0)
        return -1;
    c->head_alloc = head;
    c->ring_ready = head == c->head_cap && c->ring_cap > 0;
    return 0;
}

/* The scratch buffer, allocated on first use (no GIL needed); the fallback without memory. */
static char *scratch_slot(struct capture *c, char **scratch, char *fallback,
                          size_t fallback_size, size_t *room)
{
    c->slot_kind = SLOT_SCRATCH;
    if (!*scratch)
        *scratch = PyMem_RawMalloc(CAPTURE_READ_CHUNK);
    if (!*scratch) {
        *room = fallback_size;
        return fallback;
    }
    *room = CAPTURE_READ_CHUNK;
    return *scratch;
}

char *capture_slot(struct capture *c, char **scratch, char *fallback, size_t fallback_size,
                   size_t *room, PyThreadState **ts)
{
    if (c->lost)
        return scratch_slot(c, scratch, fallback, fallback_size, room);
    if (!c->buf && c->head_cap > 0) {
        /* Nothing kept yet: the first read lands in the caller's small buffer. A stream that
         * ends without output (most stderrs, many stdouts) then allocates nothing and takes
         * no GIL; one that has output gets a result sized for it (capture_commit). */
        c->slot_kind = SLOT_FIRST;
        *room = fallback_size < c->head_cap ? fallback_size : c->head_cap;
        return fallback;
    }
    if (c->head_len < c->head_cap) {
        /* the head doubles when it is full: a small output never gets a big buffer */
        if (c->head_alloc == c->head_len && grow_head(c, 0, ts) < 0)
            return scratch_slot(c, scratch, fallback, fallback_size, room);
        *room = c->head_alloc - c->head_len;
        if (*room > CAPTURE_READ_CHUNK)
            *room = CAPTURE_READ_CHUNK;
        c->slot_kind = SLOT_HEAD;
        return PyBytes_AS_STRING(c->buf) + c->head_len;
    }
    if (c->ring_cap >= DIRECT_RING_MIN) {
        if (!c->ring_ready && grow_head(c, 0, ts) < 0)
            return scratch_slot(c, scratch, fallback, fallback_size, room);
        *room = c->ring_cap - c->ring_pos;  /* to the ring's end: the next read wraps */
        if (*room > CAPTURE_READ_CHUNK)
            *room = CAPTURE_READ_CHUNK;
        c->slot_kind = SLOT_RING;
        return PyBytes_AS_STRING(c->buf) + c->head_cap + MARKER_MAX + c->ring_pos;
    }
    if (c->ring_cap > 0 && !c->ring_ready)
        grow_head(c, 0, ts);  /* a failure leaves the capture lost: the bytes are dropped */
    return scratch_slot(c, scratch, fallback, fallback_size, room);
}

/* Keep the n bytes at p in the ring (the tail), wrapping; only the last ring_cap bytes matter. */
static void ring_append(struct capture *c, const char *p, size_t n)
{
    char *ring = PyBytes_AS_STRING(c->buf) + c->head_cap + MARKER_MAX;
    if (n >= c->ring_cap) {
        memcpy(ring, p + n - c->ring_cap, c->ring_cap);
        c->ring_pos = 0;
        c->ring_fill = c->ring_cap;
        return;
    }
    while (n > 0) {
        size_t part = c->ring_cap - c->ring_pos;
        if (part > n)
            part = n;
        memcpy(ring + c->ring_pos, p, part);
        c->ring_pos = (c->ring_pos + part) % c->ring_cap;
        c->ring_fill = c->ring_fill + part > c->ring_cap ? c->ring_cap : c->ring_fill + part;
        p += part;
        n -= part;
    }
}

void capture_commit(struct capture *c, const char *slot, size_t n, PyThreadState **ts)
{
    c->total += n;
    switch (c->slot_kind) {
    case SLOT_FIRST:  /* n <= head_cap (capture_slot's room): all of it goes to the head */
        if (grow_head(c, n, ts) == 0) {
            memcpy(PyBytes_AS_STRING(c->buf), slot, n);
            c->head_len = n;
        }
        return;  /* no memory: lost, and counted as dropped */
    case SLOT_HEAD:
        c->head_len += n;
        return;
    case SLOT_RING:
        c->ring_pos += n;
        c->ring_fill = c->ring_fill + n > c->ring_cap ? c->ring_cap : c->ring_fill + n;
        if (c->ring_pos == c->ring_cap)
            c->ring_pos = 0;
        return;
    case SLOT_SCRATCH:
        if (!c->lost && c->ring_ready)
            ring_append(c, slot, n);
        return;  /* no ring (limit 0..1) or no memory: dropped, and counted */
    }
}

void capture_skip(struct capture *c, size_t n)
{
    c->total += n;
}

int capture_tail_fresh(const struct capture *c)
{
    /* total == head_len: nothing went past the head yet (so the ring is empty) */
    return !c->lost && c->head_len == c->head_cap && c->total == c->head_len &&
           c->ring_cap >= DIRECT_RING_MIN;
}

/* Reverse the n bytes at p. */
static void reverse(char *p, size_t n)
{
    for (size_t i = 0, j = n; i + 1 < j; i++, j--) {
        char t = p[i];
        p[i] = p[j - 1];
        p[j - 1] = t;
    }
}

PyObject *capture_finish(struct capture *c, unsigned long long *dropped)
{
    char marker[MARKER_MAX], *p;
    size_t marker_len = 0, size;
    PyObject *out;

    *dropped = c->total - c->head_len - c->ring_fill;
    if (*dropped)
        marker_len = (size_t)snprintf(marker, sizeof(marker), OMITTED_FMT, *dropped);
    if (!c->buf)
        return PyBytes_FromStringAndSize(marker, (Py_ssize_t)marker_len);
    p = PyBytes_AS_STRING(c->buf);
    if (c->ring_fill) {
        char *ring = p + c->head_cap + MARKER_MAX;
        if (c->ring_fill == c->ring_cap && c->ring_pos != 0) {
            /* wrapped: oldest bytes from ring_pos on; rotate left by ring_pos, in place */
            reverse(ring, c->ring_pos);
            reverse(ring + c->ring_pos, c->ring_cap - c->ring_pos);
            reverse(ring, c->ring_cap);
        }
        memmove(p + c->head_len + marker_len, ring, c->ring_fill);
    }
    memcpy(p + c->head_len, marker, marker_len);
    size = c->head_len + marker_len + c->ring_fill;
    out = c->buf;
    c->buf = NULL;
    if (_PyBytes_Resize(&out, (Py_ssize_t)size) < 0)
        return NULL;
    return out;
}

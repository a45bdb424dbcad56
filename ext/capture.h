/* capture.c: the bounded capture of one output stream, built in place (issue 15).
 *
 * A stream keeps its first limit/2 bytes (the head) and its last limit - limit/2 bytes (the
 * tail, a ring); what fell between is counted and replaced by a marker. The bytes object
 * returned to Python is the buffer the reads landed in: allocated at the first output (which
 * is read into a small buffer of the caller's and copied), doubled while the head fills,
 * laid out as [head][room for the marker][tail ring], and at the end the ring is rotated in
 * place, moved up against the marker, and the object shrunk. Peak
 * memory is the limit plus, for a ring smaller than a read, one read's scratch buffer.
 * Not a public API. */
#ifndef RETEST_CAPTURE_H
#define RETEST_CAPTURE_H

#include "proc_group.h"

/* Largest read, and the size of the scratch buffer. */
#define CAPTURE_READ_CHUNK (1 << 20)

enum capture_slot_kind { SLOT_HEAD, SLOT_RING, SLOT_SCRATCH, SLOT_FIRST };

struct capture {
    PyObject *buf;              /* the result being filled; NULL until the first output */
    size_t head_cap, ring_cap;  /* what the limit allows for each part */
    size_t head_alloc;          /* bytes of the head that buf has room for */
    int ring_ready;             /* buf has its full size: head, marker room and ring */
    int lost;                   /* memory ran out: buf is gone, every byte counts as dropped */
    size_t head_len, ring_pos, ring_fill;
    unsigned long long total;
    enum capture_slot_kind slot_kind;  /* where the last capture_slot pointed */
};

/* Set up a capture keeping at most limit bytes (half head, half tail). No allocation. */
void capture_init(struct capture *c, size_t limit);

/* Drop the buffer (GIL held). */
void capture_free(struct capture *c);

/* Return where the next read should land and how much it may take (*room): straight into the
 * result, or into *scratch (allocated here on first use; fallback, fallback_size when that
 * fails). Called without the GIL; takes it (through *ts) only to allocate or grow the result.
 * Never fails: without memory, reads land in scratch and are counted as dropped. */
char *capture_slot(struct capture *c, char **scratch, char *fallback, size_t fallback_size,
                   size_t *room, PyThreadState **ts);

/* Account for n bytes just read into slot, the pointer capture_slot returned; the first
 * output is copied from fallback into a result made for it then (taking the GIL via *ts). */
void capture_commit(struct capture *c, const char *slot, size_t n, PyThreadState **ts);

/* Count n bytes of the stream that were dropped without being read (tailpipe.c): older than
 * anything the ring will hold. */
void capture_skip(struct capture *c, size_t n);

/* 1 if the head is full and every further byte would go straight into an empty ring: where
 * tailpipe.c may keep the tail instead. */
int capture_tail_fresh(const struct capture *c);

/* Return the kept bytes as the result: head, a marker with the count of bytes left out when
 * there were any, then the tail in order; set *dropped. GIL held. NULL with an exception on
 * failure. The capture no longer owns the result afterwards. */
PyObject *capture_finish(struct capture *c, unsigned long long *dropped);

#endif

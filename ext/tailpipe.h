/* tailpipe.c: a stream's tail kept in pipes, not copied, until the stream ends (issue 15).
 *
 * Once a capture's head is full, every further byte is a candidate for the tail, and all but
 * the last ring_cap of them are dropped at the end. Read into the ring, each is copied into
 * the caller only to be overwritten: for a command writing 1 GiB with an 8 MiB limit, 99.6%
 * of the copies. Worse, a pipe's reader and writer take the same mutex for their copies, so
 * the writer waits while the reader copies. Here the bytes are moved instead: splice(2) takes
 * the pages from the command's pipe into a line of pipes of our own (a pipe-to-pipe splice
 * moves page references, no bytes), and whatever the line holds beyond the tail's size is
 * spliced from its oldest end into /dev/null (the pages are released, nothing is read). When
 * the stream ends, what the line holds, at most the tail, is read into the ring: the only
 * copy. Used only when nothing else wants each chunk (no on_output, no tee); any failure
 * (EMFILE, a pipe that cannot grow, pages that hold too few bytes) moves what the line holds
 * into the ring, in order, and the stream goes on read(2) as before.
 *
 * What the line holds are the writer's pages, not copies: a writer that splices a file or
 * vmsplices its own memory into its stdout, and rewrites that memory or file before the
 * stream ends, is seen with the new bytes in the tail (with read(2) only for as long as the
 * reader lagged). A caller that needs each byte as written passes on_output.
 * Not a public API. */
#ifndef RETEST_TAILPIPE_H
#define RETEST_TAILPIPE_H

#include "capture.h"

/* Pipes in one line at most (2 fds each); fewer for a caller the per-user pipe limit applies
 * to (tailpipe.c). */
#define TAILPIPE_MAX 16

struct tailpipe_link {
    int rd, wr;
    size_t held;  /* bytes in it */
};

struct tailpipe {
    int state;          /* TP_OFF, TP_ON, TP_FAILED (capture.h's ring from then on) */
    int devnull;
    size_t pipe_size;   /* the size each pipe of the line was given */
    struct tailpipe_link link[TAILPIPE_MAX];
    int max;            /* pipes this caller may have (TAILPIPE_MAX if privileged) */
    int count;          /* pipes open; link[0 .. used-1] hold bytes, oldest first */
    int used;
    size_t held;        /* bytes in the line */
    size_t keep;        /* the tail's size: what the line holds at most between calls */
};

enum { TP_OFF, TP_ON, TP_FAILED };

void tailpipe_init(struct tailpipe *t);

/* Can the line take over stream src for capture c now (its head full, a ring in the result,
 * the line not failed before)? The caller has checked that nothing else wants each chunk. */
int tailpipe_wanted(const struct tailpipe *t, const struct capture *c);

/* Move what src holds into the line, dropping (and counting in c) what falls out of the tail.
 * Return the bytes moved (> 0), 0 at EOF, -1 when src is empty (EAGAIN), or -2 when the line
 * failed: the caller then moves it into the ring (tailpipe_flush) and reads src itself. */
ssize_t tailpipe_take(struct tailpipe *t, struct capture *c, int src);

/* Read what the line holds into c's ring, oldest first, and close the line. No GIL held on
 * entry or exit (*ts: the released thread state; capture_slot may take it to allocate).
 * Scratch and fallback as for capture_slot. */
void tailpipe_flush(struct tailpipe *t, struct capture *c, char **scratch, char *fallback,
                    size_t fallback_size, PyThreadState **ts);

/* Close whatever the line still has open (its bytes are lost: the run failed before). */
void tailpipe_close(struct tailpipe *t);

#endif

/* tailpipe.c: a stream's tail kept in pipes until the stream ends (tailpipe.h). */
#define _GNU_SOURCE
#include "tailpipe.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The most one splice takes from the command's pipe, as one read would (capture.h). */
#define TAKE_CHUNK CAPTURE_READ_CHUNK
/* The size each pipe of the line is given: the default pipe-max-size, so that an unprivileged
 * caller gets it too. (Root could have bigger ones; a few more fds cost less than a probe.) */
#define LINE_PIPE_SIZE (1 << 20)
/* An EAGAIN from an empty pipe of the line while the source has bytes: the source filled
 * between the splice and FIONREAD. Tried again this many times, then the line gives up. */
#define EMPTY_RETRIES 2

/* Pipes in one line for a caller the kernel's per-user pipe limit applies to: each 1 MiB pipe
 * counts 256 pages against pipe-user-pages-soft (16384 by default), and while a user is over
 * it, every new pipe of that user, in any process, gets 8 KiB instead of 64. 7 pipes hold the
 * default limit's 4 MiB tail; a bigger tail stays in the ring for such a caller. */
#define UNPRIVILEGED_MAX 7

/* 1 if the kernel exempts this process from the per-user pipe limits: CAP_SYS_RESOURCE or
 * CAP_SYS_ADMIN in its effective set, in the initial user namespace (identity uid_map). */
static int pipe_limits_exempt(void)
{
    struct {
        uint32_t version;
        int pid;
    } hdr = {0x20080522 /* _LINUX_CAPABILITY_VERSION_3 */, 0};
    struct {
        uint32_t effective, permitted, inheritable;
    } data[2];
    char map[128];
    ssize_t n;
    int fd;
    memset(data, 0, sizeof(data));
    if (syscall(SYS_capget, &hdr, data) < 0 ||
        !(data[0].effective & ((1u << 21) | (1u << 24))))  /* CAP_SYS_ADMIN, CAP_SYS_RESOURCE */
        return 0;
    fd = open("/proc/self/uid_map", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    do
        n = read(fd, map, sizeof(map) - 1);
    while (n < 0 && errno == EINTR);
    close(fd);
    if (n <= 0)
        return 0;
    map[n] = '\0';
    {
        unsigned long inside, outside, count;
        const char *eol = strchr(map, '\n');
        return eol == map + n - 1 &&  /* one line: the whole range, mapped to itself */
               sscanf(map, "%lu %lu %lu", &inside, &outside, &count) == 3 && inside == 0 &&
               outside == 0 && count == 4294967295UL;
    }
}

/* The pipes a line for a tail of keep bytes may need: the tail in full 1 MiB pipes, the one
 * a take is filling, and one more for pages left part-full. */
static size_t pipes_needed(size_t keep)
{
    return keep / LINE_PIPE_SIZE + 3;
}

void tailpipe_init(struct tailpipe *t)
{
    memset(t, 0, sizeof(*t));
    t->devnull = -1;
    for (int i = 0; i < TAILPIPE_MAX; i++)
        t->link[i].rd = t->link[i].wr = -1;
}

int tailpipe_wanted(const struct tailpipe *t, const struct capture *c)
{
    /* a tail too big for TAILPIPE_MAX pipes stays in the ring */
    return t->state == TP_OFF && capture_tail_fresh(c) &&
           pipes_needed(c->ring_cap) <= TAILPIPE_MAX;
}

/* Open one more pipe at the line's new end. Return 0, or -1 (errno set). */
static int open_link(struct tailpipe *t)
{
    int fds[2], size;
    if (t->count >= t->max) {
        errno = ENOSPC;
        return -1;
    }
    if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) < 0)
        return -1;
    /* may fail for an unprivileged caller over pipe-user-pages-soft: EPERM */
    size = fcntl(fds[1], F_SETPIPE_SZ, LINE_PIPE_SIZE);
    if (size < 0) {
        int err = errno;
        close(fds[0]);
        close(fds[1]);
        errno = err;
        return -1;
    }
    t->pipe_size = (size_t)size;
    t->link[t->count].rd = fds[0];
    t->link[t->count].wr = fds[1];
    t->link[t->count].held = 0;
    t->count++;
    return 0;
}

/* Open /dev/null and the line's first pipe. Return 0 or -1. */
static int start(struct tailpipe *t, size_t keep)
{
    t->max = pipe_limits_exempt() ? TAILPIPE_MAX : UNPRIVILEGED_MAX;
    if (pipes_needed(keep) > (size_t)t->max)
        return -1;  /* a tail this big stays in the ring for this caller */
    t->devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (t->devnull < 0 || open_link(t) < 0)
        return -1;
    t->used = 1;
    t->keep = keep;
    t->state = TP_ON;
    return 0;
}

/* The oldest pipe is empty: it becomes the first spare, after the ones holding bytes. */
static void rotate_oldest(struct tailpipe *t)
{
    struct tailpipe_link l = t->link[0];
    memmove(&t->link[0], &t->link[1], (size_t)(t->count - 1) * sizeof(l));
    t->link[t->count - 1] = l;
    t->used--;
}

/* Drop what the line holds beyond the tail, from its oldest end, into /dev/null (no bytes are
 * read: the pages are let go), counting it in c. Return 0 or -1. */
static int trim(struct tailpipe *t, struct capture *c)
{
    while (t->held > t->keep) {
        struct tailpipe_link *l = &t->link[0];
        size_t want = t->held - t->keep;
        ssize_t n;
        if (want > l->held)
            want = l->held;
        if (want == 0)
            return -1;  /* the accounting is off: never expected, give the line up */
        n = splice(l->rd, NULL, t->devnull, NULL, want, SPLICE_F_NONBLOCK);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        l->held -= (size_t)n;
        t->held -= (size_t)n;
        capture_skip(c, (size_t)n);
        if (l->held == 0 && t->used > 1)
            rotate_oldest(t);
    }
    return 0;
}

/* The splice into the newest pipe said EAGAIN. Return -1 if the source is empty, 2 at its
 * EOF, 1 if the line went on to another pipe (try again), 0 if it cannot go on. */
static int after_eagain(struct tailpipe *t, int src, int *retries)
{
    int queued = 0;
    if (ioctl(src, FIONREAD, &queued) < 0)
        return 0;
    if (queued == 0) {
        /* A full newest pipe makes splice say EAGAIN even at EOF (opipe_prep comes after
         * ipipe_prep): without this, poll's POLLHUP and this EAGAIN would spin. */
        struct pollfd p = {.fd = src, .events = POLLIN};
        if (poll(&p, 1, 0) == 1 && (p.revents & POLLHUP) && !(p.revents & POLLIN))
            return 2;
        return -1;
    }
    if (t->link[t->used - 1].held == 0)  /* not full: the source filled just now */
        return ++*retries <= EMPTY_RETRIES;
    if (t->used < t->count || open_link(t) == 0) {
        t->used++;
        return 1;
    }
    return 0;
}

ssize_t tailpipe_take(struct tailpipe *t, struct capture *c, int src)
{
    int retries = 0;
    if (t->state == TP_OFF && start(t, c->ring_cap) < 0)
        goto failed;
    for (;;) {
        struct tailpipe_link *l = &t->link[t->used - 1];
        ssize_t n = splice(src, NULL, l->wr, NULL, TAKE_CHUNK, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        int next;
        if (n > 0) {
            l->held += (size_t)n;
            t->held += (size_t)n;
            if (trim(t, c) < 0)
                goto failed;
            /* full (whole pages): the next take goes on in the next pipe, without an EAGAIN */
            l = &t->link[t->used - 1];  /* trim may have moved the links down */
            if (l->held >= t->pipe_size && (t->used < t->count || open_link(t) == 0))
                t->used++;
            return n;
        }
        if (n == 0)
            return 0;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN)
            goto failed;  /* EINVAL: a kernel or file system without pipe splicing */
        next = after_eagain(t, src, &retries);
        if (next < 0)
            return -1;
        if (next == 2)
            return 0;
        if (next == 0)
            goto failed;
    }
failed:
    t->state = TP_FAILED;
    return -2;
}

void tailpipe_flush(struct tailpipe *t, struct capture *c, char **scratch, char *fallback,
                    size_t fallback_size, PyThreadState **ts)
{
    for (int i = 0; i < t->used; i++) {
        struct tailpipe_link *l = &t->link[i];
        while (l->held > 0) {
            size_t room;
            char *slot = capture_slot(c, scratch, fallback, fallback_size, &room, ts);
            ssize_t n;
            if (room > l->held)
                room = l->held;
            n = read(l->rd, slot, room);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {  /* never expected: the bytes are counted as dropped, not lost */
                capture_skip(c, l->held);
                l->held = 0;
                break;
            }
            capture_commit(c, slot, (size_t)n, ts);
            l->held -= (size_t)n;
        }
    }
    tailpipe_close(t);
}

void tailpipe_close(struct tailpipe *t)
{
    for (int i = 0; i < t->count; i++) {
        close(t->link[i].rd);
        close(t->link[i].wr);
        t->link[i].rd = t->link[i].wr = -1;
        t->link[i].held = 0;
    }
    t->count = t->used = 0;
    t->held = 0;
    if (t->devnull >= 0)
        close(t->devnull);
    t->devnull = -1;
}

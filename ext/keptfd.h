/* A file kept open across calls (issue 15: an open of a /proc file costs more than its read)
 * and checked before each use: code that closes descriptors it does not own may have given
 * the number to another file since, which is then left to its new owner (CPython's os.urandom
 * checks its kept /dev/urandom fd the same way). Used by the fingerprint's files
 * (fingerprint.c) and the evidence's (evidence.c). Not for the shepherd (no libc there). */
#ifndef RETEST_KEPTFD_H
#define RETEST_KEPTFD_H

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

/* One kept file, and the (device, inode) it had when opened. fd -1: not open. */
struct pg_kept {
    int fd;
    dev_t dev;
    ino_t ino;
};

/* Does k's number still name the file it opened? */
static inline int pg_kept_ours(const struct pg_kept *k)
{
    struct stat st;
    return k->fd >= 0 && fstat(k->fd, &st) == 0 && st.st_dev == k->dev && st.st_ino == k->ino;
}

/* k's fd: the kept one if it still is that file, else path opened now (flags | O_CLOEXEC).
 * Return it, or -1 with errno (k not open). */
static inline int pg_kept_open(struct pg_kept *k, const char *path, int flags)
{
    struct stat st;
    int fd;
    if (pg_kept_ours(k))
        return k->fd;
    k->fd = -1;  /* closed, or another file's now: not ours to close */
    do
        fd = open(path, flags | O_CLOEXEC);
    while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return -1;
    if (fstat(fd, &st) < 0) {
        int err = errno;
        close(fd);
        errno = err;
        return -1;
    }
    k->fd = fd;
    k->dev = st.st_dev;
    k->ino = st.st_ino;
    return fd;
}

/* Close k if its number still is that file (else leave it), and forget it. */
static inline void pg_kept_close(struct pg_kept *k)
{
    if (pg_kept_ours(k))
        close(k->fd);
    k->fd = -1;
}

/* pread fd from offset 0 into buf (at most size bytes) until the text ends: a /proc file made
 * whole (one seq_file record: status, PSI) gives all it has in one read, so a short read is
 * its end. Return the bytes read, or -1 with errno. Retries EINTR. */
static inline ssize_t pg_pread_text(int fd, char *buf, size_t size)
{
    size_t total = 0;
    while (total < size) {
        size_t want = size - total;
        ssize_t n = pread(fd, buf + total, want, (off_t)total);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        total += (size_t)n;
        if ((size_t)n < want)
            break;  /* the end (0 included) */
    }
    return (ssize_t)total;
}

#endif

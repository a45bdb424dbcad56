/* A shepherd as a child process of the caller: held by a pidfd, waited for and signalled
 * only through it. Internal to retest._proc_group (child.c). */
#ifndef RETEST_CHILD_H
#define RETEST_CHILD_H

#include <stdint.h>
#include <sys/types.h>

/* pidfd values that are not fds */
#define PG_PIDFD_NONE (-1)  /* no pidfd (pidfd_open unavailable): waits and signals by pid */
#define PG_PIDFD_GONE (-2)  /* reaped, by us or by code outside retest: nothing left to touch */

/* One shepherd of ours: its pid (for /proc and messages), its control socket, its pidfd. */
struct pg_shepherd {
    pid_t pid;
    int ctl;
    int pidfd;
    int pending;      /* its IDLE record is still to be read (pool.c: pg_shepherd_settle) */
    uint64_t cg_key;  /* pending: pg_path_key of the cgroup its last run left kept, or 0 */
};

/* Mark s as no shepherd (pid -1, no socket, no pidfd); s owns nothing afterwards. */
void pg_shepherd_clear(struct pg_shepherd *s);

/* Hold s->pid, a child just started and not yet reaped, by a pidfd. Return 0 (s->pidfd set:
 * an fd, PG_PIDFD_NONE where pidfds are unavailable, PG_PIDFD_GONE if it was reaped by
 * someone else already), or an errno (EMFILE, ENFILE, ENOMEM: it could not be held). */
int pg_shepherd_hold(struct pg_shepherd *s);

/* Reap s if it exited (WNOHANG in options: without waiting). Return 1 with *status (may be
 * NULL) a wait status, 0 if it still runs, -1 with errno set (ECHILD: someone else reaped it).
 * On 1 or ECHILD s->pidfd is closed and set to PG_PIDFD_GONE. Retries EINTR. */
int pg_shepherd_wait(struct pg_shepherd *s, int options, int *status);

/* Send sig to s, and to nothing else. Return 0, or -1 with errno set (ESRCH: it is reaped). */
int pg_shepherd_signal(const struct pg_shepherd *s, int sig);

/* Move s, an idle shepherd of ours about to get a request, onto the CPU the calling thread
 * runs on (issue 15: one CPU for the hand-off, see child.c). Only through a pidfd that says s
 * is not reaped: never a pid that may be somebody else's now. Return that CPU, or -1 if s was
 * left as it was (no pidfd, reaped, a cpuset refusal...). */
int pg_shepherd_pin(const struct pg_shepherd *s);

/* Close s's pidfd, if any (its process is left alone), and mark it PG_PIDFD_GONE. */
void pg_shepherd_close_pidfd(struct pg_shepherd *s);

#endif

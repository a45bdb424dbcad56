/* Waiting for and signalling our own shepherds, and nothing else.
 *
 * A shepherd is a child of the calling process, and code outside retest in the same process
 * may reap it first: os.waitpid(-1, 0), a SIGCHLD handler that reaps everything. Its pid is
 * then free, and the kernel may give it to another child of this process (a
 * subprocess.Popen). A wait or a kill by pid would then reap that child (stealing its exit
 * status from its owner) or kill it. So each shepherd is held by a pidfd, opened right after
 * posix_spawn: a child not yet reaped keeps its pid, so the pidfd names our shepherd, and it
 * goes on naming it (never a newcomer) after anyone reaps it. Every wait is then a
 * waitid(P_PIDFD) and every signal a pidfd_send_signal: a shepherd reaped by someone else
 * gives ECHILD or ESRCH, and nothing else is touched.
 *
 * The fallback, where pidfds are unavailable (Linux < 5.3, a seccomp filter that refuses
 * pidfd_open as some container runtimes' default profiles did, or Linux 5.3, which has
 * pidfd_open but not P_PIDFD): waits and signals by pid, as before. That is exact as long as
 * nobody else reaps our shepherds; if code outside retest does, a shepherd's reused pid may
 * be another child's, and retiring that shepherd would SIGKILL and reap that child, and the
 * end of a run would wait for it and take its status. Only a shepherd found reaped (ECHILD)
 * is marked gone, so that nothing is sent to its pid afterwards.
 */
#define _GNU_SOURCE
#include "child.h"

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "pidfd.h"

/* glibc < 2.36 does not name P_PIDFD. */
#define PG_P_PIDFD ((idtype_t)3)

/* Set once pidfd_open said ENOSYS or EPERM, or waitid refused P_PIDFD: the kernel (or a
 * seccomp filter) will not change its mind, so no later shepherd tries again. */
static int pidfds_unavailable;

/* Remember that pidfds cannot be used in this process. */
static void give_up_pidfds(void)
{
    __atomic_store_n(&pidfds_unavailable, 1, __ATOMIC_RELAXED);
}

void pg_shepherd_clear(struct pg_shepherd *s)
{
    s->pid = -1;
    s->ctl = -1;
    s->pidfd = PG_PIDFD_GONE;
    s->pending = 0;
    s->cg_key = 0;
}

int pg_shepherd_hold(struct pg_shepherd *s)
{
#ifdef SYS_pidfd_open
    if (!__atomic_load_n(&pidfds_unavailable, __ATOMIC_RELAXED)) {
        int fd = (int)syscall(SYS_pidfd_open, s->pid, 0);  /* always close-on-exec */
        if (fd >= 0) {
            s->pidfd = fd;
            return 0;
        }
        if (errno == ESRCH) {  /* already reaped, by someone else: its pid is not ours */
            s->pidfd = PG_PIDFD_GONE;
            return 0;
        }
        if (errno != ENOSYS && errno != EPERM)
            return errno;
        give_up_pidfds();
    }
#endif
    s->pidfd = PG_PIDFD_NONE;
    return 0;
}

void pg_shepherd_close_pidfd(struct pg_shepherd *s)
{
    if (s->pidfd >= 0)
        close(s->pidfd);
    s->pidfd = PG_PIDFD_GONE;
}

/* The wait status waitpid would have given for the exit that waitid described in si (Linux's
 * encoding, the one WIFEXITED, WEXITSTATUS, WIFSIGNALED, WTERMSIG and WCOREDUMP read). */
static int wait_status_of(const siginfo_t *si)
{
    switch (si->si_code) {
    case CLD_EXITED:
        return (si->si_status & 0xff) << 8;
    case CLD_DUMPED:
        return (si->si_status & 0x7f) | 0x80;
    default:  /* CLD_KILLED: WEXITED reports nothing else */
        return si->si_status & 0x7f;
    }
}

/* waitid on pidfd for an exit. Return 1 with *status (may be NULL) set, 0 if it still runs
 * (WNOHANG), -1 with errno set. */
static int wait_pidfd(int pidfd, int options, int *status)
{
    siginfo_t si;
    int rc;
    do {
        memset(&si, 0, sizeof(si));  /* WNOHANG with nothing to report leaves si_pid 0 */
        rc = waitid(PG_P_PIDFD, (id_t)pidfd, &si, WEXITED | options);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0)
        return -1;
    if (si.si_pid == 0)
        return 0;
    if (status)
        *status = wait_status_of(&si);
    return 1;
}

/* waitpid on pid, as pg_shepherd_wait returns. The fallback: see the top of the file. */
static int wait_pid(pid_t pid, int options, int *status)
{
    int st = 0;
    pid_t got;
    do {
        got = waitpid(pid, &st, options);
    } while (got < 0 && errno == EINTR);
    if (got <= 0)
        return (int)got;
    if (status)
        *status = st;
    return 1;
}

int pg_shepherd_wait(struct pg_shepherd *s, int options, int *status)
{
    int rc = -1;
    if (s->pidfd == PG_PIDFD_GONE || s->pid <= 0) {  /* never waitpid(-1): anybody's child */
        errno = ECHILD;
        return -1;
    }
    if (s->pidfd >= 0) {
        rc = wait_pidfd(s->pidfd, options, status);
        if (rc < 0 && errno == EINVAL) {  /* Linux 5.3: pidfd_open, but no P_PIDFD yet */
            give_up_pidfds();
            pg_shepherd_close_pidfd(s);
            s->pidfd = PG_PIDFD_NONE;
        }
    }
    if (s->pidfd == PG_PIDFD_NONE)
        rc = wait_pid(s->pid, options, status);
    if (rc == 1 || (rc < 0 && errno == ECHILD)) {
        int saved = errno;
        pg_shepherd_close_pidfd(s);  /* close() may clobber errno */
        errno = saved;
    }
    return rc;
}

int pg_shepherd_signal(const struct pg_shepherd *s, int sig)
{
    if (s->pidfd == PG_PIDFD_GONE || s->pid <= 0) {  /* never kill(-1) or kill(0) */
        errno = ESRCH;
        return -1;
    }
#ifdef SYS_pidfd_send_signal
    if (s->pidfd >= 0)
        return syscall(SYS_pidfd_send_signal, s->pidfd, sig, NULL, 0) == 0 ? 0 : -1;
#endif
    return kill(s->pid, sig);  /* the fallback: see the top of the file */
}

/* A run's hand-off crosses processes four times: the request wakes the shepherd, the shepherd
 * starts the command, the command's exit wakes the shepherd (SIGCHLD), the final report wakes
 * us. Woken on a CPU that sleeps, each costs an inter-processor interrupt, which on a VM is an
 * exit to the hypervisor: a round trip between two processes measured 60 us median (p90 0.4
 * ms) across two vCPUs and 11 us on one. The shepherd sleeps while we run and we sleep while
 * it does, so they can share our CPU: pinned to it, the shepherd is woken there, its command
 * starts there, and the exit's wake-ups stay there. The shepherd gives its command the mask
 * it was started with (= ours: the fingerprint) and takes it back itself after the run
 * (shepherd.c), so nothing a command inherits changes. Linux has no pidfd form of
 * sched_setaffinity: a pidfd that can still signal s says its pid is not reaped, so not
 * reused, and a pid is not reused within the microsecond that follows. */
int pg_shepherd_pin(const struct pg_shepherd *s)
{
#ifdef SYS_pidfd_send_signal
    cpu_set_t one;
    int cpu = sched_getcpu();
    if (cpu < 0 || cpu >= CPU_SETSIZE || s->pidfd < 0 || s->pid <= 0)
        return -1;
    if (syscall(SYS_pidfd_send_signal, s->pidfd, 0, NULL, 0) < 0)
        return -1;  /* reaped (ESRCH), or not signalable: leave it */
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    return sched_setaffinity(s->pid, sizeof(one), &one) == 0 ? cpu : -1;
#else
    (void)s;
    return -1;
#endif
}

/* The machine's counters around one run (issue 11's evidence, read in C since issue 15).
 *
 * run.c takes one reading while the shepherd starts the command (the caller would otherwise
 * sleep in poll: the reads cost the run nothing) and one after the tree is gone, both
 * without the GIL. proc_group.py turns the two into RunResult.pressure and .oom
 * (retest.pressure, retest.oom). Every read is best effort: a field that cannot be read is
 * -1 (absent), never an error.
 */
#ifndef RETEST_EVIDENCE_H
#define RETEST_EVIDENCE_H

#include <stdint.h>
#include <stddef.h>

#define EV_PSI_RESOURCES 3   /* cpu, memory, io: /proc/pressure/<name> */
/* A kernel log record kept for Python: its first line, at most this long. */
#define EV_KMSG_LINE_MAX 1024
/* OOM-looking records kept per run (the rest are counted), and records read at most. */
#define EV_KMSG_KEEP_MAX 32
#define EV_KMSG_READ_MAX 100000

/* One reading. PSI avg10 is in hundredths of a percent (the kernel prints two decimals). */
struct ev_machine {
    int64_t at_ns;                            /* CLOCK_MONOTONIC */
    int64_t psi_some_total[EV_PSI_RESOURCES]; /* stall microseconds since boot; -1 absent */
    int64_t psi_full_total[EV_PSI_RESOURCES];
    int64_t psi_some_avg10[EV_PSI_RESOURCES]; /* x 100; -1 absent */
    int64_t psi_full_avg10[EV_PSI_RESOURCES];
    int64_t busy_ticks;                       /* /proc/stat, the CPUs this thread may use */
    int64_t self_cpu_us;                      /* getrusage(RUSAGE_SELF) user + system */
    int64_t oom_kill, oom_group_kill;         /* /proc/vmstat; -1 absent or not read */
};

/* The kernel log over one run: the OOM-looking records (/dev/kmsg, one cursor per process). */
struct ev_kmsg {
    int marked;            /* the run's start was marked on the process's cursor */
    int open_errno;        /* why there is no cursor (0: there is) */
    int complete;          /* every record since the mark was read (no loss, no cap) */
    int collected;         /* collect ran (it may run again: it reads on from there) */
    uint64_t mark;         /* the cursor's record index when the run started */
    int n_kept;
    char *kept[EV_KMSG_KEEP_MAX];  /* malloc'd first lines, NUL-terminated */
};

/* Read the machine now; with_vmstat: also /proc/vmstat's OOM counters (25 us: not always). */
void ev_machine_read(struct ev_machine *m, int with_vmstat);

/* Mark the run's start on the process's kernel-log cursor (opened at the end of the log the
 * first time); never fails (k->marked 0, open_errno set). */
void ev_kmsg_open(struct ev_kmsg *k);
/* Read what was logged since the mark (or since the last collect), keep the OOM records. */
void ev_kmsg_collect(struct ev_kmsg *k);
/* Free what collect kept (the process's cursor stays open for the next run). */
void ev_kmsg_free(struct ev_kmsg *k);

#endif

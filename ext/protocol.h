/* The report protocol between the caller (run.c) and the shepherd (shepherd.c).
 *
 * The shepherd writes fixed-size records on fd 3 (a socketpair end); the caller writes
 * single command bytes back on the same socket. Both ends are on the same machine and
 * built from the same sources, so records are plain structs.
 */
#ifndef RETEST_PROTOCOL_H
#define RETEST_PROTOCOL_H

#include <stdint.h>

#define PG_CONTROL_FD 3

/* The shepherd's argv, as run.c builds it: [0] path, then these fields, then the command. */
enum pg_argv_field {
    PG_ARGV_DEADLINE = 1,   /* absolute CLOCK_MONOTONIC ns; < 0: no deadline */
    PG_ARGV_GRACE = 2,      /* ns from the stop signal to SIGKILL */
    PG_ARGV_STOP_SIGNAL = 3,/* the first signal of the stop sequence (SIGTERM; GNU timeout -s) */
    PG_ARGV_CWD = 4,        /* "-" or "C<path>" */
    PG_ARGV_CGROUP = 5,     /* "-", "G<path>" (required) or "g<path>" (fall back if impossible) */
    PG_ARGV_CMD = 6,        /* CMD [ARG...] from here on */
};

/* Record kinds, shepherd -> caller. */
enum pg_record_kind {
    PG_REC_STARTED = 1,     /* the command was exec'd: pid */
    PG_REC_SPAWN_FAILED = 2,/* it was not: stage + err */
    PG_REC_FINAL = 3,       /* everything is dead and reaped: the full report */
    PG_REC_LEAK = 4,        /* a process left after the command exited: pid, age, cmdline head */
};

/* Stages at which starting the command can fail (PG_REC_SPAWN_FAILED.stage). */
enum pg_spawn_stage {
    PG_STAGE_SHEPHERD = 1,  /* the shepherd itself: fork, pipe, bad arguments */
    PG_STAGE_CHDIR = 2,
    PG_STAGE_EXEC = 3,
    PG_STAGE_SETSID = 4,
    PG_STAGE_SPAWN = 5,     /* the caller could not start the shepherd (EMFILE, EAGAIN...) */
    PG_STAGE_CGROUP = 6,    /* cgroup mode was required but the command could not be placed */
};

/* At most this many PG_REC_LEAK records per run; FINAL.leak_count has the total. */
#define PG_MAX_LEAKS 50
/* Bytes of /proc/PID/cmdline kept per leak (NULs become spaces). */
#define PG_LEAK_TEXT 200

/* Command bytes, caller -> shepherd. */
#define PG_CMD_TERMINATE 'T'  /* stop now: SIGTERM + SIGCONT, grace, SIGKILL (KeyboardInterrupt) */

struct pg_record {
    int32_t kind;
    int32_t pid;              /* STARTED: leader pid (also its pgid and sid); LEAK: the process */
    int32_t stage;            /* SPAWN_FAILED */
    int32_t err;              /* SPAWN_FAILED: errno */
    int32_t wait_status;      /* FINAL: leader's raw wait status (-1: never started) */
    int32_t timed_out;        /* FINAL: the deadline fired */
    int32_t terminated;       /* FINAL: stopped on request or because the caller went away */
    int32_t escalated;        /* FINAL: SIGKILL was needed */
    int32_t killed_at_deadline;
    int32_t swept_after_exit;
    int32_t unkillable;       /* FINAL: processes that survived SIGKILL until the give-up bound */
    int32_t proc_foreign;     /* FINAL: /proc showed another pid namespace: only the group was reachable */
    int64_t utime_us;         /* FINAL: RUSAGE_CHILDREN of the shepherd = the whole tree */
    int64_t stime_us;
    int64_t maxrss_kb;
    int32_t in_cgroup;        /* STARTED, FINAL: the command runs in the run's own cgroup */
    int32_t cgroup_err;       /* STARTED: why it could not be placed there (fell back), or 0 */
    int32_t leak_count;       /* FINAL: processes left after the command exited (all, not only 50) */
    int32_t cgroup_removed;   /* FINAL: the shepherd removed the cgroup (else the caller must) */
    int64_t cg_usage_us;      /* FINAL, cgroup mode: cpu.stat, memory.peak, pids.peak; -1: absent */
    int64_t cg_user_us;
    int64_t cg_system_us;
    int64_t cg_memory_peak;
    int64_t cg_pids_peak;
    int64_t cg_oom_kill;      /* FINAL, cgroup mode: memory.events oom_kill and oom_group_kill, */
    int64_t cg_oom_group_kill;/* read just before the cgroup is removed; -1: absent */
    int64_t age_us;           /* LEAK: how long the process had been running */
    int32_t text_len;         /* LEAK: bytes of text used */
    char text[PG_LEAK_TEXT];  /* LEAK: head of its command line */
};

#endif

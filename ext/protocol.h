/* The report protocol between the caller (run.c) and the shepherd (shepherd.c).
 *
 * The caller writes a run request (struct pg_request) on fd 3, a socketpair end; the shepherd
 * answers with fixed-size records on the same socket, and takes single command bytes while
 * the run goes on. FINAL comes as soon as the tree is gone and accounted for; with reusable
 * set, the shepherd then checks itself and the cgroup it kept (off the run's critical path)
 * and sends IDLE, which says whether it may serve the next run, before it reads the next
 * request. Both ends are on the same machine and built from the same sources, so records
 * are plain structs.
 */
#ifndef RETEST_PROTOCOL_H
#define RETEST_PROTOCOL_H

#include <stdint.h>

#define PG_CONTROL_FD 3

/* The shepherd's argv: [0] its path, [1] PG_SERVE_ARG. Anything else is refused (EINVAL):
 * it was started by something other than run.c. */
#define PG_SERVE_ARG "retest-shepherd/5"

/* A run request, caller -> shepherd (issue 15: one shepherd serves run after run). The
 * header comes in one sendmsg with SCM_RIGHTS carrying the command's stdin, stdout and stderr
 * (in that order) and, with PG_REQ_CWD_FD, the caller's cwd (a directory is its inode, not its
 * name: one removed and made again may even get the old inode number back); then payload_len bytes of NUL-terminated strings:
 * [cwd if has_cwd] [cgroup path if has_cgroup] argv[0..argc) envp[0..envc). */
#define PG_REQ_MAGIC 0x52545152  /* "RQTR" */
#define PG_REQ_LAST 1            /* serve no other run: exit after FINAL */
#define PG_REQ_CG_REQUIRED 2     /* the command must run in the cgroup (else: fall back) */
#define PG_REQ_CWD_FD 4          /* a fourth fd: the caller's cwd (O_PATH), for the command */
#define PG_REQ_CG_KEEP 8         /* keep the cgroup for a later run if it ends as it was made */
#define PG_REQ_CG_REUSED 16      /* the cgroup served an earlier run: report cpu.stat deltas */
#define PG_REQ_MAX_PAYLOAD (512u << 20)  /* sanity bound, far above any ARG_MAX */

struct pg_request {
    int32_t magic;
    int32_t flags;            /* PG_REQ_* */
    int64_t deadline_ns;      /* absolute CLOCK_MONOTONIC ns; < 0: no deadline */
    int64_t grace_ns;         /* ns from the stop signal to SIGKILL */
    int32_t stop_signal;      /* the first signal of the stop sequence (SIGTERM; GNU timeout -s) */
    int32_t has_cwd;
    int32_t has_cgroup;
    int32_t argc;             /* >= 1 */
    int32_t envc;
    int32_t pin_cpu;          /* >= 0: the caller pinned us to this CPU for the hand-off (run.c);
                               * the command gets our start mask back if it has that one CPU */
    uint64_t payload_len;
};

/* Record kinds, shepherd -> caller. */
enum pg_record_kind {
    PG_REC_STARTED = 1,     /* the command was exec'd: pid */
    PG_REC_SPAWN_FAILED = 2,/* it was not: stage + err */
    PG_REC_FINAL = 3,       /* everything is dead and reaped: the full report */
    PG_REC_LEAK = 4,        /* a process left after the command exited: pid, age, cmdline head */
    PG_REC_IDLE = 5,        /* after a FINAL with reusable: reusable, cgroup_kept, as checked */
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
    int64_t utime_us;         /* FINAL: the rusage of every process of this run we reaped */
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
    int32_t reusable;         /* FINAL: no child is left and the shepherd stays: IDLE follows,
                               * else it exits right after this record. IDLE: its own state is
                               * the one it started with: it waits for the next request; else
                               * it exits right after this record */
    int32_t cgroup_kept;      /* FINAL: PG_REQ_CG_KEEP and the cgroup is empty, unkilled and
                               * without controllers: left for the caller's next run, not
                               * removed; with reusable, still to be checked as made (IDLE).
                               * IDLE: it was, and is held; 0: it was not, and was removed */
    int64_t cg_some0_us;      /* STARTED, PG_REQ_CG_REUSED: its cpu.pressure some total before
                               * the command (a new cgroup's is 0); -1: absent */
    int64_t age_us;           /* LEAK: how long the process had been running */
    int32_t text_len;         /* LEAK: bytes of text used */
    char text[PG_LEAK_TEXT];  /* LEAK: head of its command line */
};

#endif

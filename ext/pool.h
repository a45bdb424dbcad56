/* Idle shepherds kept for the next run (issue 15), and the inherited-state fingerprint that
 * decides which of them may take it. Internal to retest._proc_group. */
#ifndef RETEST_POOL_H
#define RETEST_POOL_H

#include "proc_group.h"
#include "child.h"

#include <stdint.h>
#include <sys/types.h>

/* How long a run waits for an idle shepherd's IDLE record (its checks take ~0.1 ms). */
#define PG_SETTLE_MS 2000

/* The most idle shepherds kept, whatever RETEST_SHEPHERD_POOL asks. */
#define PG_POOL_MAX 64

/* Fingerprint everything a command inherits from the process that forks it, as seen from
 * the calling thread now (credentials, umask, rlimits, scheduling, affinity, oom_score_adj,
 * cgroups, namespaces, root...; the cwd travels with each request). Called without the GIL,
 * from any number of threads (fingerprint.c). Return 0, or -1 if it could not be read (then
 * no idle shepherd may be used). */
int pg_fingerprint(uint64_t *fp);

/* Close the /proc files kept open for pg_fingerprint by threads not taking one now (they
 * open them again at their next call). */
void pg_fingerprint_close_files(void);

/* _fingerprint() -> int | None: pg_fingerprint from Python (tests, benchmarks). */
PyObject *pg_fingerprint_py(PyObject *module, PyObject *unused);
extern const char pg_fingerprint_doc[];

/* Take an idle shepherd started from state fp. Return 1 with *sh set (its socket and pidfd
 * are the caller's now), else 0. */
int pg_pool_take(uint64_t fp, struct pg_shepherd *sh);

/* Keep an idle shepherd (started from state fp) for a later run, making room by letting the
 * least recently used go when max_idle are kept; with max_idle <= 0 it goes itself. */
void pg_pool_give(uint64_t fp, const struct pg_shepherd *sh, int max_idle);

/* Take out the least recently used idle shepherd if more than keep are kept (keep < 0: any).
 * Return 1 with *sh set (the caller retires it), else 0. */
int pg_pool_evict(int keep, struct pg_shepherd *sh);

/* The key of a cgroup path in pg_shepherd.cg_key (FNV-1a 64; never 0). */
uint64_t pg_path_key(const char *path);

/* Read a pending shepherd's IDLE record (protocol.h), waiting for it up to PG_SETTLE_MS.
 * Return 0 if it may serve a run (no record was pending, or IDLE said reusable), else -1:
 * the caller retires it. No GIL needed. */
int pg_shepherd_settle(struct pg_shepherd *sh);

/* Before a run takes the kept cgroup whose pg_path_key is key: settle every idle shepherd
 * whose last run left it kept, so that the cgroup is checked whole before it serves again.
 * Return 0, or -1 if the IDLE of the shepherd that kept it (read now, or by an earlier
 * settle) said it was not kept (removed), or none came (retired). */
int pg_pool_settle_cgroup(uint64_t key);

/* Keep it if fewer than max_idle are kept. Return 1 if kept (the pool owns its fds). */
int pg_pool_put(uint64_t fp, const struct pg_shepherd *sh, int max_idle);

/* Let an idle shepherd go: hang up (it exits on EOF) and reap it, or SIGKILL it if it is
 * still ours after ~200 ms; close its fds. One reaped by someone else is left alone. No GIL
 * needed. */
void pg_pool_retire(struct pg_shepherd *sh);

/* Record that thread tid's run is served by shepherd (0: the run is over). A table of 256
 * threads at once; beyond that, runs are not recorded (the sampler then walks the thread's
 * children, as for a new shepherd). */
void pg_running_set(pid_t tid, pid_t shepherd);

/* running_shepherd(tid) -> int | None */
PyObject *pg_running_shepherd(PyObject *module, PyObject *arg);
extern const char pg_running_shepherd_doc[];

/* idle_shepherds() -> tuple of pids; close_shepherds() -> int (how many were let go). */
PyObject *pg_idle_shepherds(PyObject *module, PyObject *unused);
PyObject *pg_close_shepherds(PyObject *module, PyObject *unused);
extern const char pg_idle_shepherds_doc[], pg_close_shepherds_doc[];

#endif

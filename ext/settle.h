/* The shepherd's VERDICT after FINAL (issue 15), taken when the caller is done with the run's
 * result rather than before it.
 *
 * A shepherd that may serve the next run sends FINAL first (verdict_follows) and only then
 * checks what takes it ~100 us: whether the run's cgroup is as it was made, and whether it is
 * itself as it started. The caller builds its result meanwhile; run() then settles: reads the
 * VERDICT, gives the shepherd to the pool or lets it go, and learns whether the cgroup was
 * kept or removed (removing it itself when the shepherd could not). Until then neither the
 * shepherd nor the cgroup is anybody else's: no other run can take a cgroup whose verdict is
 * not in. Internal to retest._proc_group. */
#ifndef RETEST_SETTLE_H
#define RETEST_SETTLE_H

#include "proc_group.h"
#include "child.h"

#include <stdint.h>

/* Wrap a shepherd whose VERDICT is unread (its socket open in sh->ctl) into a token for
 * settle(); fp, may_pool (the fingerprint is valid and no terminate byte of ours is unread)
 * and pool_max say whether it may go back to the pool; cg_path (copied; NULL: no cgroup) is
 * the run's cgroup. The token owns the shepherd. NULL with an exception set (the shepherd is
 * then let go). */
PyObject *pg_pending_new(const struct pg_shepherd *sh, uint64_t fp, int may_pool, int pool_max,
                         const char *cg_path);

/* settle(token) -> (cgroup_kept, cgroup_removed): wait (GIL released, at most ~2 s) for the
 * VERDICT and act on it. A token dropped unsettled is settled by its destructor, and a cgroup
 * kept then is removed (nobody will give it back). */
PyObject *pg_settle(PyObject *module, PyObject *token);
extern const char pg_settle_doc[];

#endif

/* Internal declarations shared by the C files of retest._proc_group. Not a public API. */
#ifndef RETEST_PROC_GROUP_H
#define RETEST_PROC_GROUP_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* run.c: spawn the shepherd, stream and capture output, collect the report. */
PyObject *pg_run(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
extern const char pg_run_doc[];

/* run()'s cgroup_flags (module constants of the same names): the command must run in the
 * cgroup; keep the cgroup for a later run if it ends as made; it served an earlier run. */
#define CGROUP_REQUIRED 1
#define CGROUP_KEEP 2
#define CGROUP_REUSED 4

/* The strings run() hands to Python on every run, made once per module (multi-phase init:
 * one set per interpreter) and interned, so that a result's keys are not made, hashed and
 * interned anew on each run (PyDict_SetItemString does all three). "stdout" and "stderr" are
 * also the on_output callback's stream names, and "cgroup" also a containment value. */
#define PG_NAMES(X)                                                                               \
    X(stdout) X(stderr) X(returncode) X(spawn_error) X(spawn_errno) X(unkillable)                  \
    X(proc_foreign) X(tee_errno) X(stdout_dropped) X(stderr_dropped) X(timed_out) X(escalated)    \
    X(killed_at_deadline) X(swept_after_exit) X(pid) X(duration_s) X(user_cpu_s) X(sys_cpu_s)     \
    X(max_rss_kb) X(containment) X(cgroup) X(subreaper) X(cgroup_errno) X(cgroup_removed)        \
    X(cgroup_kept) X(cgroup_changed) X(cgroup_cpu_some0) X(leaks) X(leak_count)                  \
    X(memory_peak_bytes) X(pids_peak) X(cgroup_oom_kill) X(cgroup_oom_group_kill) X(evidence)    \
    X(prepared)

#define PG_NAME_ENUM(n) PG_N_##n,
enum { PG_NAMES(PG_NAME_ENUM) PG_N_COUNT };
#undef PG_NAME_ENUM

/* The module's state: its names, indexed by PG_N_<name>. */
typedef struct {
    PyObject *names[PG_N_COUNT];
} pg_module_state;

/* classify.c: classify(stdout, stderr, returncode, timed_out, spawn_error, escalated,
 * killed_at_deadline, is_pytest) -> (kind, rule, reason, infra). Never raises except TypeError. */
PyObject *pg_classify(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
extern const char pg_classify_doc[];

#endif

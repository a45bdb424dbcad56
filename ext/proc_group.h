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

/* classify.c: classify(stdout, stderr, returncode, timed_out, spawn_error, escalated,
 * killed_at_deadline, is_pytest) -> (kind, rule, reason, infra). Never raises except TypeError. */
PyObject *pg_classify(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
extern const char pg_classify_doc[];

#endif

/* retest._proc_group: module definition only. The work lives by area in run.c (spawn,
 * wait, capture: the caller's side), pool.c (idle shepherds), child.c (waiting for and
 * signalling a shepherd through its pidfd), fingerprint.c (the state they
 * were started from), shepherd.c (containment: a
 * separate executable) and classify.c (verdicts). Multi-phase init; the state holds the
 * interned names of proc_group.h (PG_NAMES): the result's keys and the stream names passed to
 * the output callback. */
#include "pool.h"
#include "proc_group.h"
#include "protocol.h"

static const char *const NAME_TEXT[PG_N_COUNT] = {
#define PG_NAME_TEXT(n) #n,
    PG_NAMES(PG_NAME_TEXT)
#undef PG_NAME_TEXT
};

static PyMethodDef pg_methods[] = {
    {"run", (PyCFunction)(void (*)(void))pg_run, METH_FASTCALL, pg_run_doc},
    {"classify", (PyCFunction)(void (*)(void))pg_classify, METH_FASTCALL, pg_classify_doc},
    {"idle_shepherds", pg_idle_shepherds, METH_NOARGS, pg_idle_shepherds_doc},
    {"close_shepherds", pg_close_shepherds, METH_NOARGS, pg_close_shepherds_doc},
    {"_fingerprint", pg_fingerprint_py, METH_NOARGS, pg_fingerprint_doc},
    {"running_shepherd", pg_running_shepherd, METH_O, pg_running_shepherd_doc},
    {NULL, NULL, 0, NULL},
};

/* Fill the module state. Return 0, or -1 with an exception set. */
static int pg_exec(PyObject *module)
{
    pg_module_state *st = PyModule_GetState(module);
    for (int i = 0; i < PG_N_COUNT; i++)
        if (!(st->names[i] = PyUnicode_InternFromString(NAME_TEXT[i])))
            return -1;  /* those made are cleared by pg_clear */
    if (PyModule_AddIntConstant(module, "CGROUP_REQUIRED", CGROUP_REQUIRED) < 0 ||
        PyModule_AddIntConstant(module, "CGROUP_KEEP", CGROUP_KEEP) < 0 ||
        PyModule_AddIntConstant(module, "CGROUP_REUSED", CGROUP_REUSED) < 0)
        return -1;
    return PyModule_AddStringConstant(module, "PROTOCOL", PG_SERVE_ARG);
}

static int pg_traverse(PyObject *module, visitproc visit, void *arg)
{
    pg_module_state *st = PyModule_GetState(module);
    for (int i = 0; i < PG_N_COUNT; i++)
        Py_VISIT(st->names[i]);
    return 0;
}

static int pg_clear(PyObject *module)
{
    pg_module_state *st = PyModule_GetState(module);
    for (int i = 0; i < PG_N_COUNT; i++)
        Py_CLEAR(st->names[i]);
    return 0;
}

static void pg_free(void *module)
{
    pg_clear((PyObject *)module);
}

static PyModuleDef_Slot pg_slots[] = {
    {Py_mod_exec, pg_exec},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef pg_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "retest._proc_group",
    .m_doc = "Native process-group runner of retest (private; use retest.proc_group).",
    .m_size = sizeof(pg_module_state),
    .m_methods = pg_methods,
    .m_slots = pg_slots,
    .m_traverse = pg_traverse,
    .m_clear = pg_clear,
    .m_free = pg_free,
};

PyMODINIT_FUNC PyInit__proc_group(void)
{
    return PyModuleDef_Init(&pg_module);
}

/* Shared by _cregion.c (the hot path: regions, cells, the module), _cregion_queue.c (the
 * finished records and the entry lists the export thread makes of them) and _cregion_account.c
 * (the export thread's accounting of finished regions). See _cregion.c. */
#ifndef OTEL_ML_CREGION_H
#define OTEL_ML_CREGION_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#if defined(__GNUC__)
#define INTERNAL __attribute__((visibility("hidden")))
#else
#define INTERNAL
#endif

/* Slots of an entry (a record): RECORD_LAYOUT in otel_ml/regions/recorder.py names them in
 * this order; the module exports each index and SLOTS as RECORD_SLOTS, and the recorder refuses
 * a build whose layout differs from its own. */
enum { NODE, START, END, PARENT, TOKEN, ERROR, REGION, EV_START, EV_END, CHILD, GPU, SLOTS };

/* A finished region, or a ready entry list (module backward regions) when ``entry`` is set.
 * Every object field is a strong reference or NULL. */
typedef struct {
    uint64_t id, parent_id; /* parent_id 0: the root */
    PyObject *node, *region, *error, *ev_start, *ev_end;
    PyObject *entry;
    long long start, end;
} Done;

/* Queue a finished record, taking its references (full: dropped and counted). */
INTERNAL void queue_push(Done *d);
/* Records waiting at most (``timing.MAX_FINISHED``). */
INTERNAL void queue_set_max(Py_ssize_t max_finished);
/* Forget what is queued (another recorder was installed). */
INTERNAL void queue_reset(void);
/* The entry list of region ``id`` (borrowed): a finished one, or a placeholder (with ``node`` if
 * given) until it finishes. */
INTERNAL PyObject *queue_entry_for(uint64_t id, PyObject *node);
INTERNAL int queue_init(void);
/* Module functions drain(finished) and finish(entry). */
INTERNAL PyObject *queue_drain(PyObject *module, PyObject *finished);
INTERNAL PyObject *queue_finish(PyObject *module, PyObject *entry);
/* _cregion_account.c: add PathStats, account(), close_window() and their constants to the module. */
INTERNAL int account_init(PyObject *module);

#endif

/* otel_ml.regions._cregion: the hot path of ``otel_ml.span`` (``__enter__``/``__exit__``) written in C.
 *
 * Why: between a training step's kernels the interpreter's caches are cold, and a region written
 * in Python costs about 20 us there (bytecode, frames, globals lookups, allocations) against
 * 0.7 us in a tight loop (benchmarks/bench_modules.py). Here a region allocates nothing on the
 * training thread: it pushes a C record on its context's stack and, on exit, moves it into a
 * queue (_cregion_queue.c). The export thread turns the queue into the entry lists ``PyRegion``
 * (otel_ml/regions/recorder.py) makes, in the order regions finished, with ``drain()``; the aggregator
 * cannot tell them apart.
 * ``PyRegion`` stays as the fallback (no compiler, another interpreter, OTEL_ML_PURE_PYTHON=1) and
 * for TorchDynamo, which cannot trace C methods. The tests run both (tests/test_timing.py).
 *
 * Nesting: the context variable holds a Cell per context (thread, asyncio task), set once, not
 * per region. A context copied from another (a new task) inherits the cell: it sees that it does
 * not own it (the owner is the context object) and makes its own, whose regions nest under the
 * inherited cell's innermost open region. A parent is named by its record id.
 *
 * Everything here runs under the GIL. State is set by ``configure()`` (``timing.install()``).
 */
#include "_cregion.h"
#include <structmember.h>
#include <time.h>

#define MAX_DEPTH 256 /* open regions per context; deeper ones are not recorded */

typedef struct {
    uint64_t id, parent_id; /* parent_id 0: the root */
    PyObject *node, *region, *ev_start; /* strong; ev_start may be NULL */
    long long start;
    int closed; /* closed out of order: finished, waiting for the regions above it */
} Open;

static PyObject *cvar;           /* the ContextVar holding this context's Cell */
static PyObject *recorder;       /* installed Recorder, or None: a new one empties the queue */
static PyObject *live;           /* the recorder when installed and enabled, or None */
static PyObject *root;           /* its tree's root PathNode, or None */
static PyObject *clock_fn;       /* None: CLOCK_MONOTONIC, which is time.perf_counter_ns on Linux */
static PyObject *compile_state;  /* holder of _is_compiling_flag */
static PyObject *compile_dict;   /* its __dict__ when it is a module (a faster read), else NULL */
static PyObject *events;         /* CUDA event pool or None */
static PyObject *resolve;        /* live.tree.resolve, or None */
static PyObject *str_flag, *str_record;
static uint64_t next_id;

static long long now_ns(void) {
    if (clock_fn == Py_None) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }
    PyObject *value = PyObject_CallNoArgs(clock_fn);
    if (value == NULL) return -1;
    long long ns = PyLong_AsLongLong(value);
    Py_DECREF(value);
    return ns;
}

/* ------------------------------------------------------------------ Cell */

typedef struct {
    PyObject_HEAD
    void *owner;         /* the context that made it: compared, never dereferenced */
    uint64_t base_id;    /* the inherited parent region (0: none) */
    PyObject *base_node; /* its node (strong), or NULL */
    Open *stack;
    int depth, cap, overflow;
} Cell;

static PyTypeObject *CellType;

static int cell_traverse(Cell *self, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->base_node);
    for (int i = 0; i < self->depth; i++) {
        Py_VISIT(self->stack[i].node);
        Py_VISIT(self->stack[i].region);
        Py_VISIT(self->stack[i].ev_start);
    }
    return 0;
}

static int cell_clear(Cell *self) {
    Py_CLEAR(self->base_node);
    for (int i = 0; i < self->depth; i++) {
        Py_CLEAR(self->stack[i].node);
        Py_CLEAR(self->stack[i].region);
        Py_CLEAR(self->stack[i].ev_start);
    }
    self->depth = 0;
    return 0;
}

static void cell_dealloc(Cell *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    cell_clear(self);
    PyMem_Free(self->stack);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyType_Slot cell_slots[] = {
    {Py_tp_doc, "The open regions of one context (see otel_ml.regions._cregion)."},
    {Py_tp_traverse, cell_traverse},
    {Py_tp_clear, cell_clear},
    {Py_tp_dealloc, cell_dealloc},
    {0, NULL},
};

static PyType_Spec cell_spec = {
    .name = "otel_ml.regions._cregion.Cell",
    .basicsize = sizeof(Cell),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = cell_slots,
};

/* The innermost region still open in a cell, or NULL (then its base is the parent). */
static Open *innermost(Cell *cell) {
    for (int i = cell->depth - 1; i >= 0; i--)
        if (!cell->stack[i].closed) return &cell->stack[i];
    return NULL;
}

/* This context's cell (a new reference), made when the context has none of its own. */
static Cell *own_cell(void) {
    PyObject *value;
    if (PyContextVar_Get(cvar, Py_None, &value) < 0) return NULL;
    if (Py_IS_TYPE(value, CellType) && ((Cell *)value)->owner == PyThreadState_Get()->context)
        return (Cell *)value;
    Cell *cell = PyObject_GC_New(Cell, CellType);
    if (cell == NULL) {
        Py_DECREF(value);
        return NULL;
    }
    cell->owner = NULL;
    cell->base_id = 0;
    cell->base_node = NULL;
    cell->stack = NULL;
    cell->depth = cell->cap = cell->overflow = 0;
    if (Py_IS_TYPE(value, CellType)) { /* inherited: nest under its innermost open region */
        Cell *from = (Cell *)value;
        Open *top = innermost(from);
        cell->base_id = top ? top->id : from->base_id;
        cell->base_node = top ? Py_NewRef(top->node) : Py_XNewRef(from->base_node);
    }
    Py_DECREF(value);
    PyObject_GC_Track(cell);
    PyObject *token = PyContextVar_Set(cvar, (PyObject *)cell);
    if (token == NULL) {
        Py_DECREF(cell);
        return NULL;
    }
    Py_DECREF(token);
    cell->owner = PyThreadState_Get()->context; /* a new thread has none before the set */
    return cell;
}

/* This context's cell; with ``inherited``, also one it inherited. None if there is none. */
static PyObject *current_cell(int inherited) {
    PyObject *value;
    if (PyContextVar_Get(cvar, Py_None, &value) < 0) return NULL;
    if (Py_IS_TYPE(value, CellType) &&
        (inherited || ((Cell *)value)->owner == PyThreadState_Get()->context))
        return value;
    Py_DECREF(value);
    return Py_NewRef(Py_None);
}

/* ------------------------------------------------------------------ RegionBase */

typedef struct {
    PyObject_HEAD
    PyObject *name;
    PyObject *parts;
    PyObject *cache_parent; /* the parent node the cached node was resolved under */
    PyObject *cache_node;
    char sampled;
} RegionBase;

static int rb_init(RegionBase *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"name", "parts", "sampled", NULL};
    PyObject *name, *parts;
    int sampled = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|p", kwlist, &name, &parts, &sampled)) return -1;
    Py_XSETREF(self->name, Py_NewRef(name));
    Py_XSETREF(self->parts, Py_NewRef(parts));
    Py_CLEAR(self->cache_parent);
    Py_CLEAR(self->cache_node);
    self->sampled = (char)sampled;
    return 0;
}

static int rb_traverse(RegionBase *self, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->name);
    Py_VISIT(self->parts);
    Py_VISIT(self->cache_parent);
    Py_VISIT(self->cache_node);
    return 0;
}

static int rb_clear(RegionBase *self) {
    Py_CLEAR(self->name);
    Py_CLEAR(self->parts);
    Py_CLEAR(self->cache_parent);
    Py_CLEAR(self->cache_node);
    return 0;
}

static void rb_dealloc(RegionBase *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    rb_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *return_self(RegionBase *self) {
    return Py_NewRef((PyObject *)self);
}

static int compiling(void) {
    PyObject *flag;
    if (compile_dict != NULL) {
        flag = PyDict_GetItemWithError(compile_dict, str_flag); /* borrowed */
        return flag == Py_True ? 1 : (flag == NULL && PyErr_Occurred()) ? -1 : 0;
    }
    flag = PyObject_GetAttr(compile_state, str_flag);
    if (flag == NULL) return -1;
    int result = flag == Py_True;
    Py_DECREF(flag);
    return result;
}

/* Room for one more open region in the cell (0), or -1: too deep, not recorded. */
static int reserve(Cell *cell) {
    if (cell->depth < cell->cap) return 0;
    int cap = cell->cap ? cell->cap * 2 : 8;
    Open *grown = cap <= MAX_DEPTH ? PyMem_Realloc(cell->stack, cap * sizeof(Open)) : NULL;
    if (grown == NULL) return -1;
    cell->stack = grown;
    cell->cap = cap;
    return 0;
}

static PyObject *rb_enter(RegionBase *self, PyObject *unused) {
    if (live == Py_None) return return_self(self);
    int compile = compiling();
    if (compile != 0) return compile < 0 ? NULL : return_self(self);

    Cell *cell = own_cell();
    if (cell == NULL) return NULL;
    Open *parent = innermost(cell);
    PyObject *parent_node = parent ? parent->node : cell->base_node ? cell->base_node : root;
    PyObject *node, *ev_start = NULL;
    if (self->cache_node != NULL && self->cache_parent == parent_node) {
        node = Py_NewRef(self->cache_node);
    } else { /* a new parent: Python code runs, so the stack is read again below */
        node = PyObject_CallFunctionObjArgs(resolve, parent_node, self->parts, NULL);
        if (node == NULL) goto fail;
        Py_XSETREF(self->cache_parent, Py_NewRef(parent_node));
        Py_XSETREF(self->cache_node, Py_NewRef(node));
    }
    if (events != Py_None) {
        /* record() catches and counts CUDA errors itself and returns None when it records
         * nothing (no event, or a capture in progress); anything else escaping it must not
         * reach the training loop either: the region is then timed on the host. */
        ev_start = PyObject_CallMethodNoArgs(events, str_record);
        if (ev_start == NULL) PyErr_Clear();
        else if (ev_start == Py_None) Py_CLEAR(ev_start);
    }
    if (reserve(cell) < 0) { /* too deep: not recorded; __exit__ counts it back */
        cell->overflow++;
        Py_DECREF(node);
        Py_XDECREF(ev_start);
        Py_DECREF(cell);
        return return_self(self);
    }
    parent = innermost(cell);
    Open *rec = &cell->stack[cell->depth++];
    rec->id = ++next_id;
    rec->parent_id = parent ? parent->id : cell->base_id;
    rec->node = node;
    rec->region = Py_NewRef((PyObject *)self);
    rec->ev_start = ev_start;
    rec->closed = 0;
    rec->start = now_ns();
    Py_DECREF(cell);
    if (rec->start == -1 && PyErr_Occurred()) return NULL;
    return return_self(self);

fail:
    Py_DECREF(cell);
    return NULL;
}

static PyObject *rb_exit(RegionBase *self, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *exc_type = nargs > 0 ? args[0] : Py_None;
    if (cvar == NULL) Py_RETURN_FALSE; /* never configured: nothing was opened */
    PyObject *value = current_cell(0);
    if (value == NULL) return NULL;
    if (value == Py_None) {
        Py_DECREF(value);
        Py_RETURN_FALSE; /* __enter__ did nothing (disabled, compiling, or before init) */
    }
    Cell *cell = (Cell *)value;
    if (cell->overflow > 0) { /* the innermost regions were the ones not recorded */
        cell->overflow--;
        Py_DECREF(cell);
        Py_RETURN_FALSE;
    }
    long long end = now_ns();
    if (end == -1 && PyErr_Occurred()) {
        Py_DECREF(cell);
        return NULL;
    }
    int i = cell->depth - 1;
    /* Not on top: closed out of order (e.g. hooks); find our open record further down. */
    while (i >= 0 && (cell->stack[i].region != (PyObject *)self || cell->stack[i].closed)) i--;
    if (i < 0) {
        Py_DECREF(cell);
        Py_RETURN_FALSE;
    }
    PyObject *ev_end = NULL;
    if (cell->stack[i].ev_start != NULL && events != Py_None) {
        ev_end = PyObject_CallMethodNoArgs(events, str_record);
        if (ev_end == NULL) PyErr_Clear(); /* the region still ends, timed on the host */
        else if (ev_end == Py_None) Py_CLEAR(ev_end);
        /* record() ran Python code: find our record again */
        for (i = cell->depth - 1; i >= 0; i--)
            if (cell->stack[i].region == (PyObject *)self && !cell->stack[i].closed) break;
        if (i < 0) {
            Py_XDECREF(ev_end);
            Py_DECREF(cell);
            Py_RETURN_FALSE;
        }
    }
    Open *rec = &cell->stack[i];
    Done done = {rec->id, rec->parent_id, rec->node, rec->region,
                 exc_type == Py_None ? NULL : Py_NewRef(exc_type), rec->ev_start, ev_end, NULL,
                 rec->start, end};
    rec->node = rec->region = rec->ev_start = NULL; /* moved into done */
    rec->closed = 1;
    while (cell->depth > 0 && cell->stack[cell->depth - 1].closed) cell->depth--;
    Py_DECREF(cell);
    queue_push(&done);
    Py_RETURN_FALSE;
}

static PyMethodDef rb_methods[] = {
    {"__enter__", (PyCFunction)rb_enter, METH_NOARGS, "Open the region (see otel_ml.regions.recorder)."},
    {"__exit__", (PyCFunction)(void (*)(void))rb_exit, METH_FASTCALL, "Close the region."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef rb_members[] = {
    {"name", T_OBJECT_EX, offsetof(RegionBase, name), READONLY, "The name given to span()."},
    {"_parts", T_OBJECT_EX, offsetof(RegionBase, parts), READONLY, "The name split into levels."},
    {"sampled", T_BOOL, offsetof(RegionBase, sampled), 0, "Timed on some steps only."},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot rb_slots[] = {
    {Py_tp_doc, "The C part of otel_ml.regions.recorder.Region: __enter__ and __exit__."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, rb_init},
    {Py_tp_traverse, rb_traverse},
    {Py_tp_clear, rb_clear},
    {Py_tp_dealloc, rb_dealloc},
    {Py_tp_methods, rb_methods},
    {Py_tp_members, rb_members},
    {0, NULL},
};

static PyType_Spec rb_spec = {
    .name = "otel_ml.regions._cregion.RegionBase",
    .basicsize = sizeof(RegionBase),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = rb_slots,
};

static PyObject *top(PyObject *module, PyObject *unused) {
    if (cvar == NULL) Py_RETURN_NONE;
    PyObject *value = current_cell(1);
    if (value == NULL || value == Py_None) return value;
    Cell *cell = (Cell *)value;
    Open *rec = innermost(cell);
    PyObject *entry = Py_None;
    if (rec != NULL || cell->base_id != 0)
        entry = rec ? queue_entry_for(rec->id, rec->node) : queue_entry_for(cell->base_id, cell->base_node);
    Py_XINCREF(entry);
    Py_DECREF(value);
    return entry;
}

static PyObject *configure(PyObject *module, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"cvar",          "recorder", "live",        "root", "clock",
                             "compile_state", "events",   "max_finished", NULL};
    PyObject *a_cvar, *a_recorder, *a_live, *a_root, *a_clock, *a_state, *a_events;
    Py_ssize_t a_max;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "$OOOOOOOn", kwlist, &a_cvar, &a_recorder, &a_live, &a_root,
                                     &a_clock, &a_state, &a_events, &a_max))
        return NULL;
    if (!PyContextVar_CheckExact(a_cvar)) {
        PyErr_SetString(PyExc_TypeError, "cvar must be a ContextVar");
        return NULL;
    }
    PyObject *a_resolve = Py_NewRef(Py_None);
    if (a_live != Py_None) {
        PyObject *tree = PyObject_GetAttrString(a_live, "tree");
        if (tree == NULL) {
            Py_DECREF(a_resolve);
            return NULL;
        }
        Py_SETREF(a_resolve, PyObject_GetAttrString(tree, "resolve"));
        Py_DECREF(tree);
        if (a_resolve == NULL) return NULL;
    }
    if (a_recorder != Py_None && a_recorder != recorder) queue_reset(); /* not its regions */
    Py_XSETREF(cvar, Py_NewRef(a_cvar));
    Py_XSETREF(recorder, Py_NewRef(a_recorder));
    Py_XSETREF(live, Py_NewRef(a_live));
    Py_XSETREF(root, Py_NewRef(a_root));
    Py_XSETREF(clock_fn, Py_NewRef(a_clock));
    Py_XSETREF(compile_state, Py_NewRef(a_state));
    Py_XSETREF(compile_dict, PyModule_Check(a_state) ? Py_NewRef(PyModule_GetDict(a_state)) : NULL);
    Py_XSETREF(events, Py_NewRef(a_events));
    Py_XSETREF(resolve, a_resolve);
    queue_set_max(a_max);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_VARARGS | METH_KEYWORDS,
     "Set the state the hot path reads (called by otel_ml.regions.recorder.install)."},
    {"drain", queue_drain, METH_O,
     "Append the regions finished since the last call to ``finished``, as entry lists, in the "
     "order they finished; return how many were dropped meanwhile (buffer full)."},
    {"finish", queue_finish, METH_O, "Queue a ready entry list among the finished regions, in order."},
    {"top", top, METH_NOARGS,
     "The entry of the innermost open region of this thread or task (a placeholder list with its "
     "node, filled in when it finishes), or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "otel_ml.regions._cregion", "C hot path of otel_ml.span (see otel_ml.regions.recorder).", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__cregion(void) {
    str_flag = PyUnicode_InternFromString("_is_compiling_flag");
    str_record = PyUnicode_InternFromString("record");
    if (!str_flag || !str_record || queue_init() < 0) return NULL;
    /* Not live until configure(): every region is a no-op. */
    recorder = Py_NewRef(Py_None);
    live = Py_NewRef(Py_None);
    root = Py_NewRef(Py_None);
    clock_fn = Py_NewRef(Py_None);
    events = Py_NewRef(Py_None);
    resolve = Py_NewRef(Py_None);
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) return NULL;
    CellType = (PyTypeObject *)PyType_FromSpec(&cell_spec);
    if (CellType == NULL) {
        Py_DECREF(module);
        return NULL;
    }
    PyObject *type = PyType_FromSpec(&rb_spec);
    if (type == NULL || PyModule_AddObject(module, "RegionBase", type) < 0) {
        Py_XDECREF(type);
        Py_DECREF(module);
        return NULL;
    }
    if (account_init(module) < 0) { /* PathStats and account(): see _cregion_account.c */
        Py_DECREF(module);
        return NULL;
    }
    /* The record layout this build was compiled with: otel_ml.regions.recorder checks it at
     * import against RECORD_LAYOUT and refuses a build that disagrees. */
    static const struct { const char *name; int slot; } layout[] = {
        {"NODE", NODE}, {"START", START}, {"END", END}, {"PARENT", PARENT},
        {"TOKEN", TOKEN}, {"ERROR", ERROR}, {"REGION", REGION}, {"EV_START", EV_START},
        {"EV_END", EV_END}, {"CHILD", CHILD}, {"GPU", GPU}, {"RECORD_SLOTS", SLOTS},
    };
    for (size_t i = 0; i < sizeof(layout) / sizeof(layout[0]); i++) {
        if (PyModule_AddIntConstant(module, layout[i].name, layout[i].slot) < 0) {
            Py_DECREF(module);
            return NULL;
        }
    }
    return module;
}

/* otel_ml._cregion: the hot path of ``otel_ml.span`` (``__enter__``/``__exit__``) written in C.
 *
 * Why: between a training step's kernels the interpreter's caches are cold, and a region written
 * in Python costs about 20 us there (bytecode, frames, globals lookups, allocations) against
 * 0.7 us in a tight loop; this one costs about a quarter of that (benchmarks/bench_modules.py).
 * It produces the same entry lists into the same queue as ``PyRegion`` in otel_ml/timing.py,
 * which stays as the fallback (no compiler, another interpreter, OTEL_ML_PURE_PYTHON=1) and for
 * TorchDynamo, which cannot trace C methods. The tests run both (tests/test_timing.py).
 *
 * One difference in how the innermost open entry is kept. ``PyRegion`` sets the context variable
 * to the entry on enter and resets it on exit: two new HAMTs and a Token per region, about half
 * the cost of a region here. This one sets the variable once per context (thread, asyncio task)
 * to a mutable Cell owned by that context, and moves ``cell.top`` on enter and exit. A context
 * copied from another (a new task) inherits the cell: it sees that it does not own it (the owner
 * is the context object) and makes its own, starting from the inherited top.
 *
 * State is set by ``configure()`` (called by ``timing.install()``), read under the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <time.h>

/* Slots of an entry: keep in step with NODE, START, ... in otel_ml/timing.py. */
enum { NODE, START, END, PARENT, TOKEN, ERROR, REGION, EV_START, EV_END, CHILD, GPU, SLOTS };

static PyObject *cvar;           /* the ContextVar holding the innermost open entry */
static PyObject *recorder;       /* installed Recorder, or None */
static PyObject *live;           /* the recorder when installed and enabled, or None */
static PyObject *root;           /* its tree's root PathNode, or None */
static PyObject *finished;       /* its queue of finished entries (a deque) */
static PyObject *finished_append;
static PyObject *clock_fn;          /* None: CLOCK_MONOTONIC, which is time.perf_counter_ns on Linux */
static PyObject *compile_state;  /* holder of _is_compiling_flag */
static PyObject *compile_dict;   /* its __dict__ when it is a module (a faster read), else NULL */
static PyObject *events;         /* CUDA event pool or None */
static PyObject *resolve;        /* live.tree.resolve, or None */
static Py_ssize_t max_finished;
static PyObject *str_flag, *str_record, *str_finish, *zero_float;

static PyObject *now(void) {
    if (clock_fn == Py_None) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return PyLong_FromLongLong((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
    }
    return PyObject_CallNoArgs(clock_fn);
}

/* Replace item i of a list (steals value). */
static inline void put(PyObject *entry, Py_ssize_t i, PyObject *value) {
    PyObject *old = PyList_GET_ITEM(entry, i);
    PyList_SET_ITEM(entry, i, value);
    Py_XDECREF(old);
}

/* The innermost open entry of one context: ``top`` (an entry list or None). */
typedef struct {
    PyObject_HEAD
    void *owner; /* the context that made it: compared, never dereferenced */
    PyObject *top;
} Cell;

static PyTypeObject *CellType;

static int cell_traverse(Cell *self, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->top);
    return 0;
}

static int cell_clear(Cell *self) {
    Py_CLEAR(self->top);
    return 0;
}

static void cell_dealloc(Cell *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    cell_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMemberDef cell_members[] = {
    {"top", T_OBJECT, offsetof(Cell, top), READONLY, "The innermost open entry, or None."},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot cell_slots[] = {
    {Py_tp_doc, "Where a context keeps its innermost open region (see otel_ml._cregion)."},
    {Py_tp_traverse, cell_traverse},
    {Py_tp_clear, cell_clear},
    {Py_tp_dealloc, cell_dealloc},
    {Py_tp_members, cell_members},
    {0, NULL},
};

static PyType_Spec cell_spec = {
    .name = "otel_ml._cregion.Cell",
    .basicsize = sizeof(Cell),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = cell_slots,
};

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
    cell->top = Py_NewRef(Py_IS_TYPE(value, CellType) ? ((Cell *)value)->top : Py_None);
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

/* This context's cell if it has one, else None (new references). */
static PyObject *current_cell(void) {
    PyObject *value;
    if (PyContextVar_Get(cvar, Py_None, &value) < 0) return NULL;
    if (Py_IS_TYPE(value, CellType) && ((Cell *)value)->owner == PyThreadState_Get()->context) return value;
    Py_DECREF(value); /* none, or inherited: nothing of this context is open in it */
    return Py_NewRef(Py_None);
}

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
    Py_INCREF(name);
    Py_XSETREF(self->name, name);
    Py_INCREF(parts);
    Py_XSETREF(self->parts, parts);
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
    Py_INCREF(self);
    return (PyObject *)self;
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

static PyObject *rb_enter(RegionBase *self, PyObject *unused) {
    if (live == Py_None) return return_self(self);
    int compile = compiling();
    if (compile != 0) return compile < 0 ? NULL : return_self(self);

    Cell *cell = own_cell();
    if (cell == NULL) return NULL;
    PyObject *parent = cell->top; /* borrowed from here on: entries keep their parents alive */
    while (parent != Py_None && PyList_GET_ITEM(parent, END) != Py_None) /* closed out of order */
        parent = PyList_GET_ITEM(parent, PARENT);
    PyObject *parent_node = parent == Py_None ? root : PyList_GET_ITEM(parent, NODE);
    PyObject *node;
    if (self->cache_node != NULL && self->cache_parent == parent_node) {
        node = Py_NewRef(self->cache_node);
    } else {
        node = PyObject_CallFunctionObjArgs(resolve, parent_node, self->parts, NULL);
        if (node == NULL) goto fail;
        Py_XSETREF(self->cache_parent, Py_NewRef(parent_node));
        Py_XSETREF(self->cache_node, Py_NewRef(node));
    }
    PyObject *entry = PyList_New(SLOTS);
    if (entry == NULL) {
        Py_DECREF(node);
        goto fail;
    }
    PyList_SET_ITEM(entry, NODE, node);
    PyList_SET_ITEM(entry, START, PyLong_FromLong(0));
    PyList_SET_ITEM(entry, PARENT, Py_NewRef(parent));
    PyList_SET_ITEM(entry, REGION, Py_NewRef((PyObject *)self));
    PyList_SET_ITEM(entry, CHILD, Py_NewRef(zero_float));
    static const int nones[] = {END, TOKEN, ERROR, EV_START, EV_END, GPU};
    for (size_t i = 0; i < sizeof(nones) / sizeof(nones[0]); i++)
        PyList_SET_ITEM(entry, nones[i], Py_NewRef(Py_None));
    if (events != Py_None) {
        PyObject *event = PyObject_CallMethodNoArgs(events, str_record);
        if (event == NULL) {
            Py_DECREF(entry);
            goto fail;
        }
        put(entry, EV_START, event);
    }
    Py_SETREF(cell->top, entry); /* the cell takes our reference */
    Py_DECREF(cell);
    PyObject *start = now();
    if (start == NULL) return NULL;
    put(entry, START, start);
    return return_self(self);

fail:
    Py_DECREF(cell);
    return NULL;
}

static PyObject *rb_exit(RegionBase *self, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *exc_type = nargs > 0 ? args[0] : Py_None;
    if (cvar == NULL) Py_RETURN_FALSE; /* never configured: nothing was opened */
    PyObject *value = current_cell();
    if (value == NULL) return NULL;
    if (value == Py_None) {
        Py_DECREF(value);
        Py_RETURN_FALSE;
    }
    Cell *cell = (Cell *)value;
    PyObject *end = now();
    if (end == NULL) {
        Py_DECREF(cell);
        return NULL;
    }
    PyObject *entry = cell->top;
    if (entry != Py_None && PyList_GET_ITEM(entry, REGION) == (PyObject *)self &&
        PyList_GET_ITEM(entry, END) == Py_None) {
        put(entry, END, end);
        Py_INCREF(entry); /* ours now: the cell lets go of it */
        Py_SETREF(cell->top, Py_NewRef(PyList_GET_ITEM(entry, PARENT)));
    } else {
        /* Not on top: closed out of order (e.g. hooks); find our open entry further up. */
        while (entry != Py_None &&
               (PyList_GET_ITEM(entry, REGION) != (PyObject *)self || PyList_GET_ITEM(entry, END) != Py_None))
            entry = PyList_GET_ITEM(entry, PARENT);
        if (entry == Py_None) { /* __enter__ did nothing (disabled, compiling, or before init) */
            Py_DECREF(end);
            Py_DECREF(cell);
            Py_RETURN_FALSE;
        }
        put(entry, END, end);
        Py_INCREF(entry);
    }
    Py_DECREF(cell);
    if (exc_type != Py_None) put(entry, ERROR, Py_NewRef(exc_type));
    if (PyList_GET_ITEM(entry, EV_START) != Py_None && events != Py_None) {
        PyObject *event = PyObject_CallMethodNoArgs(events, str_record);
        if (event == NULL) goto fail;
        put(entry, EV_END, event);
    }
    PyObject *done;
    Py_ssize_t queued = PyObject_Length(finished);
    if (queued < 0) goto fail;
    if (queued < max_finished)
        done = PyObject_CallOneArg(finished_append, entry);
    else if (recorder != Py_None)
        done = PyObject_CallMethodOneArg(recorder, str_finish, entry); /* counts the drop */
    else
        done = Py_NewRef(Py_None);
    if (done == NULL) goto fail;
    Py_DECREF(done);
    Py_DECREF(entry);
    Py_RETURN_FALSE;

fail:
    Py_DECREF(entry);
    return NULL;
}

static PyObject *top(PyObject *module, PyObject *unused) {
    if (cvar == NULL) Py_RETURN_NONE;
    PyObject *value = current_cell();
    if (value == NULL || value == Py_None) return value;
    PyObject *entry = Py_NewRef(((Cell *)value)->top);
    Py_DECREF(value);
    return entry;
}

static PyMethodDef rb_methods[] = {
    {"__enter__", (PyCFunction)rb_enter, METH_NOARGS, "Open the region (see otel_ml.timing)."},
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
    {Py_tp_doc, "The C part of otel_ml.timing.Region: __enter__ and __exit__."},
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
    .name = "otel_ml._cregion.RegionBase",
    .basicsize = sizeof(RegionBase),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = rb_slots,
};

static PyObject *configure(PyObject *module, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"cvar", "recorder", "live", "root", "finished", "clock",
                             "compile_state", "events", "max_finished", NULL};
    PyObject *a_cvar, *a_recorder, *a_live, *a_root, *a_finished, *a_clock, *a_state, *a_events;
    Py_ssize_t a_max;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "$OOOOOOOOn", kwlist, &a_cvar, &a_recorder, &a_live,
                                     &a_root, &a_finished, &a_clock, &a_state, &a_events, &a_max))
        return NULL;
    if (!PyContextVar_CheckExact(a_cvar)) {
        PyErr_SetString(PyExc_TypeError, "cvar must be a ContextVar");
        return NULL;
    }
    PyObject *append = PyObject_GetAttrString(a_finished, "append");
    if (append == NULL) return NULL;
    PyObject *a_resolve = Py_None;
    Py_INCREF(a_resolve);
    if (a_live != Py_None) {
        PyObject *tree = PyObject_GetAttrString(a_live, "tree");
        if (tree == NULL) {
            Py_DECREF(append);
            Py_DECREF(a_resolve);
            return NULL;
        }
        Py_SETREF(a_resolve, PyObject_GetAttrString(tree, "resolve"));
        Py_DECREF(tree);
        if (a_resolve == NULL) {
            Py_DECREF(append);
            return NULL;
        }
    }
    Py_XSETREF(cvar, Py_NewRef(a_cvar));
    Py_XSETREF(recorder, Py_NewRef(a_recorder));
    Py_XSETREF(live, Py_NewRef(a_live));
    Py_XSETREF(root, Py_NewRef(a_root));
    Py_XSETREF(finished, Py_NewRef(a_finished));
    Py_XSETREF(finished_append, append);
    Py_XSETREF(clock_fn, Py_NewRef(a_clock));
    Py_XSETREF(compile_state, Py_NewRef(a_state));
    Py_XSETREF(compile_dict, PyModule_Check(a_state) ? Py_NewRef(PyModule_GetDict(a_state)) : NULL);
    Py_XSETREF(events, Py_NewRef(a_events));
    Py_XSETREF(resolve, a_resolve);
    max_finished = a_max;
    Py_RETURN_NONE;
}

static PyObject *monotonic_ns(PyObject *module, PyObject *unused) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return PyLong_FromLongLong((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
}

static PyMethodDef module_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_VARARGS | METH_KEYWORDS,
     "Set the state the hot path reads (called by otel_ml.timing.install)."},
    {"top", top, METH_NOARGS,
     "The innermost open region entry of this thread or task, or None (from its context's Cell)."},
    {"monotonic_ns", monotonic_ns, METH_NOARGS,
     "The clock used when configured with clock=None (CLOCK_MONOTONIC, in ns)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "otel_ml._cregion", "C hot path of otel_ml.span (see otel_ml.timing).", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__cregion(void) {
    str_flag = PyUnicode_InternFromString("_is_compiling_flag");
    str_record = PyUnicode_InternFromString("record");
    str_finish = PyUnicode_InternFromString("finish");
    zero_float = PyFloat_FromDouble(0.0);
    if (!str_flag || !str_record || !str_finish || !zero_float) return NULL;
    /* Not live until configure(): every region is a no-op. */
    cvar = NULL;
    recorder = Py_NewRef(Py_None);
    live = Py_NewRef(Py_None);
    root = Py_NewRef(Py_None);
    finished = NULL;
    finished_append = NULL;
    clock_fn = Py_NewRef(Py_None);
    compile_state = NULL;
    compile_dict = NULL;
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
    return module;
}

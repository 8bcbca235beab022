/* otel_ml.regions._cregion, the queue: finished region records, and the entry lists the export thread makes
 * of them (``drain()``), in the order the regions finished. The training thread only pushes C
 * structs here (``queue_push``); every Python object an entry needs is made in ``drain()``.
 * A parent is named by its record id: its entry is a placeholder (``pending``) until it finishes,
 * and stays findable for two drains after (``recent``), for children closed after it.
 * Everything here runs under the GIL. See _cregion.c.
 */
#include "_cregion.h"

static Done *buffer, *spare; /* finished records; drain() swaps them */
static Py_ssize_t buffer_len, buffer_cap, spare_cap, dropped, max_finished = 1 << 18;
static int draining;
static PyObject *pending;    /* record id -> entry list of a region not finished yet */
static PyObject *recent;     /* record id -> entry of a region finished in this drain */
static PyObject *recent_old; /* ... and in the one before (children closed after it) */
static PyObject *zero_float;

int queue_init(void) {
    zero_float = PyFloat_FromDouble(0.0);
    pending = PyDict_New();
    recent = PyDict_New();
    recent_old = PyDict_New();
    return zero_float && pending && recent && recent_old ? 0 : -1;
}

void queue_set_max(Py_ssize_t max) {
    max_finished = max > 0 ? max : 1;
}

static void release_done(Done *d) {
    Py_XDECREF(d->node);
    Py_XDECREF(d->region);
    Py_XDECREF(d->error);
    Py_XDECREF(d->ev_start);
    Py_XDECREF(d->ev_end);
    Py_XDECREF(d->entry);
}

/* Take a finished record (its references too); full: count a drop. */
void queue_push(Done *d) {
    if (buffer_len >= max_finished) {
        dropped++;
        release_done(d);
        return;
    }
    if (buffer_len == buffer_cap) {
        Py_ssize_t cap = buffer_cap ? buffer_cap * 2 : 1024;
        if (cap > max_finished) cap = max_finished;
        Done *grown = cap > buffer_cap ? PyMem_Realloc(buffer, cap * sizeof(Done)) : NULL;
        if (grown == NULL) {
            dropped++;
            release_done(d);
            return;
        }
        buffer = grown;
        buffer_cap = cap;
    }
    buffer[buffer_len++] = *d;
}

void queue_reset(void) {
    for (Py_ssize_t i = 0; i < buffer_len; i++) release_done(&buffer[i]);
    buffer_len = 0;
    PyDict_Clear(pending);
    PyDict_Clear(recent);
    PyDict_Clear(recent_old);
}

static PyObject *new_entry(void) {
    PyObject *entry = PyList_New(SLOTS);
    if (entry == NULL) return NULL;
    for (int i = 0; i < SLOTS; i++) PyList_SET_ITEM(entry, i, Py_NewRef(i == CHILD ? zero_float : Py_None));
    return entry;
}

static inline void put(PyObject *entry, Py_ssize_t i, PyObject *value) { /* steals value */
    PyObject *old = PyList_GET_ITEM(entry, i);
    PyList_SET_ITEM(entry, i, value);
    Py_XDECREF(old);
}

PyObject *queue_entry_for(uint64_t id, PyObject *node) {
    PyObject *key = PyLong_FromUnsignedLongLong(id);
    if (key == NULL) return NULL;
    PyObject *entry = PyDict_GetItemWithError(recent, key);
    if (entry == NULL && !PyErr_Occurred()) entry = PyDict_GetItemWithError(recent_old, key);
    if (entry == NULL && !PyErr_Occurred()) entry = PyDict_GetItemWithError(pending, key);
    if (entry == NULL && !PyErr_Occurred()) {
        entry = new_entry();
        if (entry != NULL) {
            if (node != NULL) put(entry, NODE, Py_NewRef(node));
            int failed = PyDict_SetItem(pending, key, entry);
            Py_DECREF(entry); /* the dict keeps it */
            if (failed) entry = NULL;
        }
    }
    Py_DECREF(key);
    return entry;
}

/* Fill a finished record's entry (new reference), taking the record's references. */
static PyObject *finish_entry(Done *d) {
    PyObject *key = PyLong_FromUnsignedLongLong(d->id);
    if (key == NULL) return NULL;
    PyObject *entry = PyDict_GetItemWithError(pending, key);
    if (entry != NULL) {
        Py_INCREF(entry);
        if (PyDict_DelItem(pending, key) < 0) goto fail;
    } else if (PyErr_Occurred() || (entry = new_entry()) == NULL) {
        goto fail;
    }
    PyObject *parent = d->parent_id ? queue_entry_for(d->parent_id, NULL) : Py_None;
    PyObject *start = PyLong_FromLongLong(d->start), *end = PyLong_FromLongLong(d->end);
    if (parent == NULL || start == NULL || end == NULL) {
        Py_XDECREF(start);
        Py_XDECREF(end);
        goto fail;
    }
    put(entry, NODE, d->node);
    put(entry, START, start);
    put(entry, END, end);
    put(entry, PARENT, Py_NewRef(parent));
    put(entry, REGION, d->region);
    put(entry, ERROR, d->error ? d->error : Py_NewRef(Py_None));
    put(entry, EV_START, d->ev_start ? d->ev_start : Py_NewRef(Py_None));
    put(entry, EV_END, d->ev_end ? d->ev_end : Py_NewRef(Py_None));
    d->node = d->region = d->error = d->ev_start = d->ev_end = NULL;
    if (PyDict_SetItem(recent, key, entry) < 0) {
        Py_DECREF(entry);
        entry = NULL;
    }
    Py_DECREF(key);
    return entry;
fail:
    Py_XDECREF(entry);
    Py_DECREF(key);
    return NULL;
}

PyObject *queue_drain(PyObject *module, PyObject *finished) {
    if (draining) return PyLong_FromLong(0);
    Done *mine = buffer;
    Py_ssize_t n = buffer_len, mine_cap = buffer_cap, lost = dropped;
    buffer = spare, buffer_cap = spare_cap, buffer_len = 0, dropped = 0;
    spare = NULL, spare_cap = 0;
    draining = 1;
    PyObject *older = recent_old; /* forget the entries of two drains ago */
    recent_old = recent;
    recent = older;
    PyDict_Clear(recent);
    PyObject *append = PyObject_GetAttrString(finished, "append");
    for (Py_ssize_t i = 0; i < n; i++) {
        Done *d = &mine[i];
        if (append != NULL && !PyErr_Occurred()) { /* after an error: release the rest */
            PyObject *entry = d->entry ? Py_NewRef(d->entry) : finish_entry(d);
            PyObject *ok = entry ? PyObject_CallOneArg(append, entry) : NULL;
            Py_XDECREF(entry);
            Py_XDECREF(ok);
        }
        release_done(d);
    }
    Py_XDECREF(append);
    if (PyDict_GET_SIZE(pending) > max_finished) PyDict_Clear(pending); /* never finished */
    if (spare == NULL) {
        spare = mine, spare_cap = mine_cap;
    } else {
        PyMem_Free(mine);
    }
    draining = 0;
    if (PyErr_Occurred()) return NULL;
    return PyLong_FromSsize_t(lost);
}

PyObject *queue_finish(PyObject *module, PyObject *entry) {
    Done done = {0};
    done.entry = Py_NewRef(entry);
    queue_push(&done);
    Py_RETURN_NONE;
}

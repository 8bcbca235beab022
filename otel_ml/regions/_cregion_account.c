/* otel_ml.regions._cregion, the accounting: the export thread's per-region loop of
 * ``Aggregator._drain_finished`` (otel_ml/regions/aggregator.py) for regions timed on the host,
 * and ``PathStats``, the C twin of otel_ml.regions.stats.PathStats that it updates.
 *
 * Why: in Python the loop costs about 1 us per region (attribute reads and writes, float
 * objects, a tuple per histogram observation); here the statistics are C fields (the reservoir a
 * C array, which ``samples`` reads as a new list) and each touched histogram series is read once
 * and written back once per call.
 *
 * ``account(finished, opened, stats, histograms, gpu)`` pops entries from the ``finished`` deque
 * in order while neither CUDA event slot is set, and for each: host duration, the parent's child
 * time, the GPU slot (None), the node's statistics (made on first sight, seeded as the Python
 * ones are), the duration histogram of the node's export path (``histograms``, a
 * otel_ml.histogram.LabeledHistograms whose lock the caller holds), and appends it to ``opened``.
 * It stops at the first entry that has CUDA events and leaves it in place: the Python loop
 * resolves its events, clears them and calls again with ``gpu`` set to its GPU seconds (None when
 * unreadable), which then counts for that first entry. Returns how many entries it accounted.
 * ``close_window()`` is the common part of closing a step (``Aggregator._drain_boundaries``); the
 * sampler, the flags, the spans and the callbacks stay in Python.
 *
 * Results are those of the Python loop, bit for bit (same float operations in the same order),
 * except which reservoir samples are kept past RESERVOIR: the rng is splitmix64, not
 * random.Random (uniform and deterministic per seed all the same). Everything runs under the GIL;
 * every failure is a Python exception, after writing back what was already accounted.
 */
#include "_cregion.h"
#include <limits.h>
#include <structmember.h>

#define RESERVOIR 4096 /* otel_ml.regions.stats.RESERVOIR: the aggregator refuses a build that differs */
#define ACCOUNTING 1   /* version of account()'s contract, checked by the aggregator */

/* ------------------------------------------------------------------ PathStats */

typedef struct {
    PyObject_HEAD
    Py_ssize_t count, gpu_count, windows;
    double total, self_total, host_total, min, max, window_time;
    double *samples; /* the reservoir: nsamples of at most RESERVOIR, room for cap */
    Py_ssize_t nsamples, cap;
    char sampled;
    uint64_t rng;
    uint64_t gen;    /* the account() call that last found this path's series ... */
    Py_ssize_t slot; /* ... and its accumulator there */
    uint64_t window; /* the close_window() call that last counted this path */
} Stats;

static PyTypeObject *StatsType;
static uint64_t last_gen;
static PyObject *str_popleft, *str_append, *str_export, *str_sampled, *str_series, *str_bounds,
    *str_series_for, *str_counts, *str_sum, *str_min, *str_max;

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static Stats *stats_make(PyTypeObject *type, long long seed) {
    Stats *self = (Stats *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->samples = NULL;
    self->nsamples = self->cap = 0;
    self->count = self->gpu_count = self->windows = 0;
    self->total = self->self_total = self->host_total = self->window_time = 0.0;
    self->min = Py_HUGE_VAL;
    self->max = -Py_HUGE_VAL;
    self->sampled = 0;
    self->rng = (uint64_t)seed;
    self->gen = 0;
    self->slot = 0;
    self->window = 0;
    return self;
}

static PyObject *stats_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"seed", NULL};
    long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|L", kwlist, &seed)) return NULL;
    return (PyObject *)stats_make(type, seed);
}

/* PathStats.add: the sample first (the one step that can fail), then the moments. */
static int stats_add(Stats *self, double duration, double self_time, double host, int gpu) {
    Py_ssize_t count = self->count + 1, held = self->nsamples, slot = held;
    if (held >= RESERVOIR) { /* keep each of the count values with probability RESERVOIR/count */
        double u = (double)(splitmix64(&self->rng) >> 11) * 0x1.0p-53;
        slot = (Py_ssize_t)(u * (double)count);
    } else if (held == self->cap) {
        Py_ssize_t cap = self->cap ? self->cap * 4 : 64;
        if (cap > RESERVOIR) cap = RESERVOIR;
        double *grown = PyMem_Realloc(self->samples, cap * sizeof(double));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->samples = grown;
        self->cap = cap;
    }
    if (slot < RESERVOIR) {
        self->samples[slot] = duration;
        if (slot == held) self->nsamples++;
    }
    self->count = count;
    self->gpu_count += gpu != 0;
    self->total += duration;
    self->self_total += self_time;
    self->host_total += host;
    if (duration < self->min) self->min = duration;
    if (duration > self->max) self->max = duration;
    return 0;
}

static PyObject *stats_add_method(Stats *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"duration", "self_time", "host", "gpu", NULL};
    double duration, self_time, host;
    int gpu = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "ddd|p", kwlist, &duration, &self_time, &host, &gpu))
        return NULL;
    if (stats_add(self, duration, self_time, host, gpu) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *stats_samples(Stats *self, void *closure) {
    PyObject *list = PyList_New(self->nsamples);
    if (list == NULL) return NULL;
    for (Py_ssize_t i = 0; i < self->nsamples; i++) {
        PyObject *value = PyFloat_FromDouble(self->samples[i]);
        if (value == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, value);
    }
    return list;
}

static void stats_dealloc(Stats *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyMem_Free(self->samples);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyGetSetDef stats_getset[] = {
    {"samples", (getter)stats_samples, NULL, "The reservoir of durations, for percentiles (a new list).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef stats_methods[] = {
    {"add", (PyCFunction)(void (*)(void))stats_add_method, METH_VARARGS | METH_KEYWORDS,
     "add(duration, self_time, host, gpu=False): one more region of this path (seconds)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef stats_members[] = {
    {"count", T_PYSSIZET, offsetof(Stats, count), 0, "Regions timed."},
    {"gpu_count", T_PYSSIZET, offsetof(Stats, gpu_count), 0, "Of them, timed on the GPU."},
    {"total", T_DOUBLE, offsetof(Stats, total), 0, "Summed duration, seconds."},
    {"self_total", T_DOUBLE, offsetof(Stats, self_total), 0, "Summed self time, seconds."},
    {"host_total", T_DOUBLE, offsetof(Stats, host_total), 0, "Summed host time, seconds."},
    {"min", T_DOUBLE, offsetof(Stats, min), 0, "Shortest duration (inf before the first)."},
    {"max", T_DOUBLE, offsetof(Stats, max), 0, "Longest duration (-inf before the first)."},
    {"windows", T_PYSSIZET, offsetof(Stats, windows), 0, "Closed steps in which the path ran."},
    {"window_time", T_DOUBLE, offsetof(Stats, window_time), 0, "Their summed duration, seconds."},
    {"sampled", T_BOOL, offsetof(Stats, sampled), 0, "Timed on some steps only."},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot stats_slots[] = {
    {Py_tp_doc, "PathStats(seed=0): running statistics of one path, the C twin of "
                "otel_ml.regions.stats.PathStats (same attributes and add())."},
    {Py_tp_new, stats_new},
    {Py_tp_dealloc, stats_dealloc},
    {Py_tp_methods, stats_methods},
    {Py_tp_members, stats_members},
    {Py_tp_getset, stats_getset},
    {0, NULL},
};

static PyType_Spec stats_spec = {
    .name = "otel_ml.regions._cregion.PathStats",
    .basicsize = sizeof(Stats),
    .flags = Py_TPFLAGS_DEFAULT, /* refers to no object: no cycles */
    .slots = stats_slots,
};

/* ------------------------------------------------------------------ account() */

/* One histogram series touched by this call: read at first touch, written back at the end. */
typedef struct {
    PyObject *series; /* strong */
    double sum, min, max;
} Acc;

typedef struct {
    PyObject *histograms, *all_series; /* borrowed from the caller / strong */
    double *bounds;
    Py_ssize_t nbounds, n, cap;
    Acc *accs;
    Py_ssize_t *deltas; /* cap rows of nbounds + 1 bucket increments */
    uint64_t gen;
} Batch;

static int read_double(PyObject *obj, PyObject *name, double *out) {
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL) return -1;
    *out = PyFloat_AsDouble(value);
    Py_DECREF(value);
    return *out == -1.0 && PyErr_Occurred() ? -1 : 0;
}

static int write_double(PyObject *obj, PyObject *name, double value) {
    PyObject *boxed = PyFloat_FromDouble(value);
    if (boxed == NULL) return -1;
    int failed = PyObject_SetAttr(obj, name, boxed);
    Py_DECREF(boxed);
    return failed;
}

/* The accumulator of a path's series in this call (its index), found once per path per call. */
static Py_ssize_t batch_slot(Batch *b, Stats *stats, PyObject *node) {
    if (stats->gen == b->gen) return stats->slot;
    PyObject *export = PyObject_GetAttr(node, str_export);
    if (export == NULL) return -1;
    PyObject *key = PyTuple_Pack(1, export);
    Py_DECREF(export);
    if (key == NULL) return -1;
    PyObject *series = PyDict_GetItemWithError(b->all_series, key); /* borrowed */
    if (series != NULL) {
        Py_INCREF(series);
    } else if (!PyErr_Occurred()) {
        series = PyObject_CallMethodOneArg(b->histograms, str_series_for, key);
    }
    Py_DECREF(key);
    if (series == NULL) return -1;
    Py_ssize_t i = 0;
    while (i < b->n && b->accs[i].series != series) i++;
    if (i < b->n) {
        Py_DECREF(series); /* folded paths share a series: one accumulator */
    } else {
        if (b->n == b->cap) {
            Py_ssize_t cap = b->cap ? b->cap * 2 : 16, row = b->nbounds + 1;
            Acc *accs = PyMem_Realloc(b->accs, cap * sizeof(Acc));
            if (accs != NULL) b->accs = accs;
            Py_ssize_t *deltas = accs ? PyMem_Realloc(b->deltas, cap * row * sizeof(Py_ssize_t)) : NULL;
            if (deltas == NULL) {
                Py_DECREF(series);
                PyErr_NoMemory();
                return -1;
            }
            b->deltas = deltas;
            b->cap = cap;
        }
        Acc *acc = &b->accs[i];
        if (read_double(series, str_sum, &acc->sum) < 0 || read_double(series, str_min, &acc->min) < 0 ||
            read_double(series, str_max, &acc->max) < 0) {
            Py_DECREF(series);
            return -1;
        }
        acc->series = series;
        memset(&b->deltas[i * (b->nbounds + 1)], 0, (b->nbounds + 1) * sizeof(Py_ssize_t));
        b->n++;
    }
    stats->gen = b->gen;
    stats->slot = i;
    return i;
}

/* Write every accumulator back to its series (counts, sum, min, max) and release them. */
static int batch_flush(Batch *b) {
    int failed = 0;
    Py_ssize_t buckets = b->nbounds + 1;
    for (Py_ssize_t i = 0; i < b->n; i++) {
        Acc *acc = &b->accs[i];
        Py_ssize_t *delta = &b->deltas[i * buckets];
        if (!failed) {
            PyObject *counts = PyObject_GetAttr(acc->series, str_counts);
            if (counts == NULL) {
                failed = 1;
            } else if (!PyList_CheckExact(counts) || PyList_GET_SIZE(counts) != buckets) {
                PyErr_SetString(PyExc_TypeError, "a histogram series has counts of another size");
                failed = 1;
            } else {
                for (Py_ssize_t k = 0; k < buckets && !failed; k++) {
                    if (delta[k] == 0) continue;
                    PyObject *step = PyLong_FromSsize_t(delta[k]);
                    PyObject *sum = step ? PyNumber_Add(PyList_GET_ITEM(counts, k), step) : NULL;
                    Py_XDECREF(step);
                    if (sum == NULL) failed = 1;
                    else PyList_SetItem(counts, k, sum); /* steals sum */
                }
            }
            Py_XDECREF(counts);
            if (!failed && (write_double(acc->series, str_sum, acc->sum) < 0 ||
                            write_double(acc->series, str_min, acc->min) < 0 ||
                            write_double(acc->series, str_max, acc->max) < 0))
                failed = 1;
        }
        Py_CLEAR(acc->series);
    }
    b->n = 0;
    return failed ? -1 : 0;
}

/* (end - start) / 1e9 as Python computes it: exact int difference, then one rounding. */
static int seconds_between(PyObject *start, PyObject *end, double *out) {
    if (PyLong_CheckExact(start) && PyLong_CheckExact(end)) {
        int over_a, over_b;
        long long a = PyLong_AsLongLongAndOverflow(end, &over_a);
        long long b = PyLong_AsLongLongAndOverflow(start, &over_b);
        int fits = !over_a && !over_b && !PyErr_Occurred() &&
                   (b >= 0 ? a >= LLONG_MIN + b : a <= LLONG_MAX + b); /* a - b does not overflow */
        if (fits) {
            *out = (double)(a - b) / 1e9;
            return 0;
        }
        if (PyErr_Occurred()) return -1;
    }
    PyObject *diff = PyNumber_Subtract(end, start);
    if (diff == NULL) return -1;
    PyObject *billion = PyFloat_FromDouble(1e9);
    PyObject *seconds = billion ? PyNumber_TrueDivide(diff, billion) : NULL;
    Py_DECREF(diff);
    Py_XDECREF(billion);
    if (seconds == NULL) return -1;
    *out = PyFloat_AsDouble(seconds);
    Py_DECREF(seconds);
    return *out == -1.0 && PyErr_Occurred() ? -1 : 0;
}

/* The statistics of ``node`` (a new reference), made as the Python loop makes them. */
static Stats *stats_for(PyObject *all_stats, PyObject *node, PyObject *region) {
    PyObject *found = PyDict_GetItemWithError(all_stats, node);
    if (found != NULL) {
        if (!Py_IS_TYPE(found, StatsType)) {
            PyErr_SetString(PyExc_TypeError, "account() needs the C PathStats (the Python loop made these)");
            return NULL;
        }
        return (Stats *)Py_NewRef(found);
    }
    if (PyErr_Occurred()) return NULL;
    Stats *stats = stats_make(StatsType, (long long)PyDict_GET_SIZE(all_stats));
    if (stats == NULL) return NULL;
    PyObject *sampled = PyObject_GetAttr(region, str_sampled);
    int truth = sampled ? PyObject_IsTrue(sampled) : -1;
    Py_XDECREF(sampled);
    if (truth < 0 || PyDict_SetItem(all_stats, node, (PyObject *)stats) < 0) {
        Py_DECREF(stats);
        return NULL;
    }
    stats->sampled = (char)truth;
    return stats;
}

static inline void put_slot(PyObject *entry, Py_ssize_t i, PyObject *value) { /* steals value */
    PyObject *old = PyList_GET_ITEM(entry, i);
    PyList_SET_ITEM(entry, i, value);
    Py_XDECREF(old);
}

/* One entry (borrowed, at the head of ``finished``): 1 accounted, 0 has CUDA events, -1 error. */
static int account_one(Batch *b, PyObject *entry, PyObject *all_stats, PyObject *popleft, PyObject *append,
                       PyObject *gpu) {
    if (!PyList_CheckExact(entry) || PyList_GET_SIZE(entry) < SLOTS) {
        PyErr_SetString(PyExc_TypeError, "a finished region must be an entry list");
        return -1;
    }
    PyObject **item = ((PyListObject *)entry)->ob_item;
    if (item[EV_START] != Py_None || item[EV_END] != Py_None) return 0;
    double host, duration, child;
    if (seconds_between(item[START], item[END], &host) < 0) return -1;
    duration = host;
    if (gpu != Py_None) {
        duration = PyFloat_AsDouble(gpu);
        if (duration == -1.0 && PyErr_Occurred()) return -1;
    }
    PyObject *node = item[NODE];
    Stats *stats = stats_for(all_stats, node, item[REGION]);
    if (stats == NULL) return -1;
    Py_ssize_t slot = batch_slot(b, stats, node);
    /* Python code may have run (a new series): read the entry again */
    item = ((PyListObject *)entry)->ob_item;
    child = slot < 0 ? 0.0 : PyFloat_AsDouble(item[CHILD]);
    PyObject *parent = item[PARENT], *parent_child = NULL;
    if (slot >= 0 && !PyErr_Occurred() && parent != Py_None) {
        if (!PyList_CheckExact(parent) || PyList_GET_SIZE(parent) < SLOTS) {
            PyErr_SetString(PyExc_TypeError, "a region's parent must be an entry list");
        } else {
            PyObject *before = PyList_GET_ITEM(parent, CHILD);
            if (PyFloat_CheckExact(before)) {
                parent_child = PyFloat_FromDouble(PyFloat_AS_DOUBLE(before) + duration);
            } else {
                PyObject *boxed = PyFloat_FromDouble(duration);
                parent_child = boxed ? PyNumber_Add(before, boxed) : NULL;
                Py_XDECREF(boxed);
            }
        }
    }
    if (slot < 0 || PyErr_Occurred()) {
        Py_XDECREF(parent_child);
        Py_DECREF(stats);
        return -1;
    }
    Py_INCREF(entry); /* popleft() gives up the deque's reference */
    PyObject *popped = PyObject_CallNoArgs(popleft);
    if (popped != entry) {
        if (popped != NULL) PyErr_SetString(PyExc_RuntimeError, "finished regions changed while accounting");
        Py_XDECREF(popped);
        Py_XDECREF(parent_child);
        Py_DECREF(stats);
        Py_DECREF(entry);
        return -1;
    }
    Py_DECREF(popped);
    if (parent_child != NULL) put_slot(parent, CHILD, parent_child);
    put_slot(entry, GPU, Py_NewRef(gpu));
    double self_time = duration - child;
    int failed = stats_add(stats, duration, self_time > 0.0 ? self_time : 0.0, host, gpu != Py_None);
    Py_DECREF(stats);
    if (!failed) {
        Acc *acc = &b->accs[slot];
        const double *bounds = b->bounds;
        Py_ssize_t lo = 0, hi = b->nbounds;
        while (lo < hi) { /* bisect_left */
            Py_ssize_t mid = (lo + hi) / 2;
            if (bounds[mid] < duration) lo = mid + 1;
            else hi = mid;
        }
        b->deltas[slot * (b->nbounds + 1) + lo]++;
        acc->sum += duration;
        if (duration < acc->min) acc->min = duration;
        if (duration > acc->max) acc->max = duration;
        PyObject *ok = PyObject_CallOneArg(append, entry);
        Py_XDECREF(ok);
        failed = ok == NULL;
    }
    Py_DECREF(entry);
    return failed ? -1 : 1;
}

static PyObject *account(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "account(finished, opened, stats, histograms, gpu)");
        return NULL;
    }
    PyObject *finished = args[0], *opened = args[1], *all_stats = args[2], *gpu = args[4];
    if (!PyDict_CheckExact(all_stats)) {
        PyErr_SetString(PyExc_TypeError, "stats must be a dict");
        return NULL;
    }
    if (gpu != Py_None && !PyFloat_Check(gpu)) {
        PyErr_SetString(PyExc_TypeError, "gpu must be a float or None");
        return NULL;
    }
    Batch b = {.histograms = args[3], .gen = ++last_gen};
    PyObject *popleft = NULL, *append = NULL, *bounds = NULL;
    Py_ssize_t done = 0;
    int failed = 1;
    b.all_series = PyObject_GetAttr(b.histograms, str_series);
    if (b.all_series == NULL) goto exit;
    if (!PyDict_CheckExact(b.all_series)) {
        PyErr_SetString(PyExc_TypeError, "histograms._series must be a dict");
        goto exit;
    }
    bounds = PyObject_GetAttr(b.histograms, str_bounds);
    if (bounds == NULL) goto exit;
    if (!PyTuple_CheckExact(bounds)) {
        PyErr_SetString(PyExc_TypeError, "histograms.bounds must be a tuple");
        goto exit;
    }
    b.nbounds = PyTuple_GET_SIZE(bounds);
    b.bounds = PyMem_Malloc((b.nbounds + 1) * sizeof(double));
    if (b.bounds == NULL) {
        PyErr_NoMemory();
        goto exit;
    }
    for (Py_ssize_t i = 0; i < b.nbounds; i++) {
        b.bounds[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, i));
        if (b.bounds[i] == -1.0 && PyErr_Occurred()) goto exit;
    }
    popleft = PyObject_GetAttr(finished, str_popleft);
    append = popleft ? PyObject_GetAttr(opened, str_append) : NULL;
    if (append == NULL) goto exit;
    for (;;) {
        Py_ssize_t left = PyObject_Size(finished);
        if (left < 0) goto exit;
        if (left == 0) break;
        PyObject *entry = PySequence_GetItem(finished, 0);
        if (entry == NULL) goto exit;
        int got = account_one(&b, entry, all_stats, popleft, append, gpu);
        Py_DECREF(entry);
        if (got < 0) goto exit;
        if (got == 0) break; /* CUDA events: the Python loop resolves them */
        done++;
        gpu = Py_None; /* the GPU time given was the first entry's */
    }
    failed = 0;
exit:
    if (b.n > 0) {
        /* a first error wins over one while writing back */
#if PY_VERSION_HEX >= 0x030C0000
        PyObject *first = PyErr_GetRaisedException();
        if (batch_flush(&b) < 0) {
            if (first != NULL) PyErr_Clear();
            failed = 1;
        }
        if (first != NULL) PyErr_SetRaisedException(first);
#else
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        if (batch_flush(&b) < 0) {
            if (type != NULL) PyErr_Clear();
            failed = 1;
        }
        if (type != NULL) PyErr_Restore(type, value, traceback);
#endif
    }
    PyMem_Free(b.accs);
    PyMem_Free(b.deltas);
    PyMem_Free(b.bounds);
    Py_XDECREF(b.all_series);
    Py_XDECREF(bounds);
    Py_XDECREF(popleft);
    Py_XDECREF(append);
    return failed ? NULL : PyLong_FromSsize_t(done);
}

/* close_window(pending, end_ns, duration, stats, inside): the common part of closing a step in
 * Aggregator._drain_boundaries. Moves the entries of ``pending`` (the opened deque) that ended at
 * or before ``end_ns`` into the list ``inside``, in order; each path among them counts the step
 * once (``windows`` + 1, ``window_time`` + duration). Returns whether one of them raised. */
static PyObject *close_window(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "close_window(pending, end_ns, duration, stats, inside)");
        return NULL;
    }
    PyObject *pending = args[0], *end_ns = args[1], *all_stats = args[3], *inside = args[4];
    double duration = PyFloat_AsDouble(args[2]);
    if (duration == -1.0 && PyErr_Occurred()) return NULL;
    if (!PyDict_CheckExact(all_stats) || !PyList_CheckExact(inside)) {
        PyErr_SetString(PyExc_TypeError, "close_window() needs a stats dict and an inside list");
        return NULL;
    }
    PyObject *popleft = PyObject_GetAttr(pending, str_popleft);
    if (popleft == NULL) return NULL;
    uint64_t gen = ++last_gen;
    int errored = 0, failed = 1;
    for (;;) {
        Py_ssize_t left = PyObject_Size(pending);
        if (left < 0) goto exit;
        if (left == 0) break;
        PyObject *entry = PySequence_GetItem(pending, 0);
        if (entry == NULL) goto exit;
        if (!PyList_CheckExact(entry) || PyList_GET_SIZE(entry) < SLOTS) {
            Py_DECREF(entry);
            PyErr_SetString(PyExc_TypeError, "an opened region must be an entry list");
            goto exit;
        }
        int inside_step = PyObject_RichCompareBool(PyList_GET_ITEM(entry, END), end_ns, Py_LE);
        if (inside_step <= 0) {
            Py_DECREF(entry);
            if (inside_step < 0) goto exit;
            break;
        }
        PyObject *popped = PyObject_CallNoArgs(popleft);
        int moved = popped == entry && PyList_Append(inside, entry) == 0;
        if (popped != NULL && popped != entry)
            PyErr_SetString(PyExc_RuntimeError, "opened regions changed while closing a step");
        Py_XDECREF(popped);
        if (!moved) {
            Py_DECREF(entry);
            goto exit;
        }
        if (PyList_GET_ITEM(entry, ERROR) != Py_None) errored = 1;
        PyObject *stats = PyDict_GetItemWithError(all_stats, PyList_GET_ITEM(entry, NODE));
        Py_DECREF(entry);
        if (stats == NULL) {
            if (PyErr_Occurred()) goto exit;
            continue;
        }
        if (!Py_IS_TYPE(stats, StatsType)) {
            PyErr_SetString(PyExc_TypeError, "close_window() needs the C PathStats (the Python loop made these)");
            goto exit;
        }
        Stats *s = (Stats *)stats;
        if (s->window != gen) { /* steps in which this path ran: once per step */
            s->window = gen;
            s->windows++;
            s->window_time += duration;
        }
    }
    failed = 0;
exit:
    Py_DECREF(popleft);
    if (failed) return NULL;
    return Py_NewRef(errored ? Py_True : Py_False);
}

static PyMethodDef account_methods[] = {
    {"close_window", (PyCFunction)(void (*)(void))close_window, METH_FASTCALL,
     "close_window(pending, end_ns, duration, stats, inside): move a closed step's regions from "
     "pending to inside, count the step once per path that ran in it; True if one of them raised."},
    {"account", (PyCFunction)(void (*)(void))account, METH_FASTCALL,
     "account(finished, opened, stats, histograms, gpu): Aggregator._drain_finished's loop for the "
     "regions timed on the host, up to the first one with CUDA events (see _cregion_account.c); "
     "the caller holds the histograms' lock. Returns how many regions it accounted."},
    {NULL, NULL, 0, NULL},
};

int account_init(PyObject *module) {
    static const struct { PyObject **slot; const char *text; } names[] = {
        {&str_popleft, "popleft"}, {&str_append, "append"}, {&str_export, "export"},
        {&str_sampled, "sampled"}, {&str_series, "_series"}, {&str_bounds, "bounds"},
        {&str_series_for, "series_for"}, {&str_counts, "counts"}, {&str_sum, "sum"},
        {&str_min, "min"}, {&str_max, "max"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        *names[i].slot = PyUnicode_InternFromString(names[i].text);
        if (*names[i].slot == NULL) return -1;
    }
    StatsType = (PyTypeObject *)PyType_FromSpec(&stats_spec);
    if (StatsType == NULL) return -1;
    if (PyModule_AddObjectRef(module, "PathStats", (PyObject *)StatsType) < 0) return -1;
    if (PyModule_AddFunctions(module, account_methods) < 0) return -1;
    if (PyModule_AddIntConstant(module, "RESERVOIR", RESERVOIR) < 0) return -1;
    return PyModule_AddIntConstant(module, "ACCOUNTING", ACCOUNTING);
}

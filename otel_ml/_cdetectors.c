/* otel_ml._cdetectors: the C twins of RollingStats, SpikeDetector, PlateauDetector and
 * ExplosionDetector (otel_ml/detectors.py, whose Python classes are the reference and the fallback).
 *
 * Why: the anomaly monitor runs these once per logged value of loss, KL and grad norm, on the
 * scrape thread, on caches the training has evicted since the last scrape. In Python each value
 * costs two to four calls and a deque of float objects (about 1 us, half the monitor's time);
 * here the window is a C array and a value is one call.
 *
 * Same constructors (positional or keyword, same defaults), same methods and attributes as the
 * Python classes, except that the detectors keep their window inside (no ``stats`` attribute).
 * The float operations are those of the Python code in the same order, so the results are the
 * same (where a compiler fuses a multiply and an add, not on x86-64's baseline, a last bit may
 * differ). A window grows as values arrive, up to its size: a large configured window costs
 * memory only once it fills.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <structmember.h>

#define DETECTORS 1 /* version of this contract, checked by otel_ml.detectors */

/* ------------------------------------------------------------------ the window */

typedef struct {
    double *values;               /* cap slots; while n < window the values are values[0..n) */
    Py_ssize_t window, cap, n, head; /* once full (n == window == cap), head is the oldest */
    double sum, sumsq;
} Ring;

static void ring_init(Ring *r, Py_ssize_t window) {
    r->values = NULL;
    r->window = window < 1 ? 1 : window;
    r->cap = r->n = r->head = 0;
    r->sum = r->sumsq = 0.0;
}

static int ring_add(Ring *r, double value) {
    if (r->n >= r->window) {
        double old = r->values[r->head];
        r->values[r->head] = value;
        r->head = (r->head + 1) % r->window;
        r->sum += value - old;
        r->sumsq += value * value - old * old;
        return 0;
    }
    if (r->n == r->cap) {
        Py_ssize_t cap = r->cap ? r->cap * 2 : 16;
        if (cap > r->window || cap < r->cap) cap = r->window;
        double *grown = PyMem_Realloc(r->values, (size_t)cap * sizeof(double));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        r->values = grown;
        r->cap = cap;
    }
    r->values[r->n++] = value;
    r->sum += value;
    r->sumsq += value * value;
    return 0;
}

static double ring_mean(const Ring *r) { return r->n ? r->sum / (double)r->n : NAN; }

static double ring_std(const Ring *r) {
    if (r->n < 2) return 0.0;
    double n = (double)r->n;
    double variance = (r->sumsq - r->sum * r->sum / n) / (n - 1);
    return variance > 0.0 ? sqrt(variance) : 0.0;
}

/* RollingStats.check_and_add: 1 spike (kept out of the window), 0 added, -1 error. */
static int ring_check_and_add(Ring *r, double value, double zscore, Py_ssize_t warmup, double min_rise) {
    Py_ssize_t count = r->n;
    if (zscore > 0 && count >= warmup && count) {
        double n = (double)count, total = r->sum;
        double mean = total / n;
        double variance = count > 1 ? (r->sumsq - total * total / n) / (n - 1) : 0.0;
        double limit = variance > 0.0 ? mean + zscore * sqrt(variance) : mean;
        if (value > limit && value - mean > min_rise * fabs(mean)) return 1;
    }
    return ring_add(r, value) < 0 ? -1 : 0;
}

static int as_double(PyObject *arg, double *out) {
    *out = PyFloat_AsDouble(arg);
    return *out == -1.0 && PyErr_Occurred() ? -1 : 0;
}

static PyObject *verdict(int result) {
    if (result < 0) return NULL;
    return PyBool_FromLong(result);
}

/* ------------------------------------------------------------------ RollingStats */

typedef struct {
    PyObject_HEAD
    Ring ring;
} Stats;

static PyObject *stats_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"window", NULL};
    Py_ssize_t window;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "n:RollingStats", keywords, &window)) return NULL;
    Stats *self = (Stats *)type->tp_alloc(type, 0);
    if (self != NULL) ring_init(&self->ring, window);
    return (PyObject *)self;
}

/* Every type here starts with a Stats: this frees any of them. */
static void stats_dealloc(Stats *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyMem_Free(self->ring.values);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *stats_add(Stats *self, PyObject *arg) {
    double value;
    if (as_double(arg, &value) < 0 || ring_add(&self->ring, value) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *stats_add_and_mean(Stats *self, PyObject *arg) {
    double value;
    if (as_double(arg, &value) < 0 || ring_add(&self->ring, value) < 0) return NULL;
    return PyFloat_FromDouble(self->ring.sum / (double)self->ring.n);
}

static PyObject *stats_check_and_add(Stats *self, PyObject *const *args, Py_ssize_t nargs) {
    double value, zscore, min_rise;
    Py_ssize_t warmup;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "check_and_add() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    if (as_double(args[0], &value) < 0 || as_double(args[1], &zscore) < 0) return NULL;
    warmup = PyNumber_AsSsize_t(args[2], PyExc_OverflowError);
    if (warmup == -1 && PyErr_Occurred()) return NULL;
    if (as_double(args[3], &min_rise) < 0) return NULL;
    return verdict(ring_check_and_add(&self->ring, value, zscore, warmup, min_rise));
}

static Py_ssize_t stats_len(Stats *self) { return self->ring.n; }

static PyObject *stats_mean(Stats *self, void *closure) {
    return PyFloat_FromDouble(ring_mean(&self->ring));
}

static PyObject *stats_std(Stats *self, void *closure) { return PyFloat_FromDouble(ring_std(&self->ring)); }

static PyMethodDef stats_methods[] = {
    {"add", (PyCFunction)stats_add, METH_O, "add(value): the value joins the window."},
    {"add_and_mean", (PyCFunction)stats_add_and_mean, METH_O, "add(value), then the new mean."},
    {"check_and_add", (PyCFunction)(void (*)(void))stats_check_and_add, METH_FASTCALL,
     "check_and_add(value, zscore, warmup, min_rise): True for a spike, else the value joins."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef stats_getset[] = {
    {"mean", (getter)stats_mean, NULL, "Mean of the window (nan when empty).", NULL},
    {"std", (getter)stats_std, NULL, "Sample standard deviation of the window (0 below 2 values).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot stats_slots[] = {
    {Py_tp_doc, "RollingStats(window): mean and std of the last window values, the C twin of "
                "otel_ml.detectors.PyRollingStats."},
    {Py_tp_new, stats_new},
    {Py_tp_dealloc, stats_dealloc},
    {Py_tp_methods, stats_methods},
    {Py_tp_getset, stats_getset},
    {Py_sq_length, stats_len},
    {0, NULL},
};

/* ------------------------------------------------------------------ SpikeDetector */

typedef struct {
    Stats base; /* first: its window, which stats_dealloc frees */
    double zscore, min_rise, maximum;
    Py_ssize_t warmup;
} Spike;

static PyObject *spike_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"window", "zscore", "min_rise", "warmup", "maximum", NULL};
    Py_ssize_t window = 100, warmup = 20;
    double zscore = 6.0, min_rise = 0.5, maximum = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|nddnd:SpikeDetector", keywords, &window, &zscore,
                                     &min_rise, &warmup, &maximum))
        return NULL;
    Spike *self = (Spike *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    ring_init(&self->base.ring, window);
    self->zscore = zscore;
    self->min_rise = min_rise;
    self->warmup = warmup;
    self->maximum = maximum;
    return (PyObject *)self;
}

static PyObject *spike_observe(Spike *self, PyObject *arg) {
    double value;
    if (as_double(arg, &value) < 0) return NULL;
    if (self->maximum > 0 && value > self->maximum) Py_RETURN_TRUE;
    return verdict(ring_check_and_add(&self->base.ring, value, self->zscore, self->warmup, self->min_rise));
}

static PyMethodDef spike_methods[] = {
    {"observe", (PyCFunction)spike_observe, METH_O, "observe(value): True when value is a spike."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef spike_members[] = {
    {"zscore", T_DOUBLE, offsetof(Spike, zscore), 0, "Standard deviations above the mean (0: off)."},
    {"min_rise", T_DOUBLE, offsetof(Spike, min_rise), 0, "Relative rise above the mean needed too."},
    {"warmup", T_PYSSIZET, offsetof(Spike, warmup), 0, "Values seen before any verdict."},
    {"maximum", T_DOUBLE, offsetof(Spike, maximum), 0, "Absolute limit (0: none)."},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot spike_slots[] = {
    {Py_tp_doc, "SpikeDetector(window=100, zscore=6.0, min_rise=0.5, warmup=20, maximum=0.0): the C "
                "twin of otel_ml.detectors.PySpikeDetector."},
    {Py_tp_new, spike_new},
    {Py_tp_dealloc, stats_dealloc},
    {Py_tp_methods, spike_methods},
    {Py_tp_members, spike_members},
    {0, NULL},
};

/* ------------------------------------------------------------------ PlateauDetector */

typedef struct {
    Stats base; /* first: its window, which stats_dealloc frees */
    double tolerance, best;
    Py_ssize_t patience, since;
} Plateau;

static PyObject *plateau_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"patience", "tolerance", "smoothing", NULL};
    Py_ssize_t patience = 1000, smoothing = 50;
    double tolerance = 0.01;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|ndn:PlateauDetector", keywords, &patience, &tolerance,
                                     &smoothing))
        return NULL;
    Plateau *self = (Plateau *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    ring_init(&self->base.ring, smoothing);
    self->patience = patience;
    self->tolerance = tolerance;
    self->best = INFINITY;
    self->since = 0;
    return (PyObject *)self;
}

static PyObject *plateau_observe(Plateau *self, PyObject *arg) {
    double value;
    if (as_double(arg, &value) < 0) return NULL;
    if (self->patience <= 0) Py_RETURN_FALSE;
    Ring *ring = &self->base.ring;
    if (ring_add(ring, value) < 0) return NULL;
    double level = ring->sum / (double)ring->n, best = self->best;
    if (level < best - self->tolerance * fabs(best) || isinf(best)) {
        self->best = level;
        self->since = 0;
        Py_RETURN_FALSE;
    }
    self->since += 1;
    return PyBool_FromLong(self->since >= self->patience);
}

static PyMethodDef plateau_methods[] = {
    {"observe", (PyCFunction)plateau_observe, METH_O, "observe(value): True while the loss is on a plateau."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef plateau_members[] = {
    {"patience", T_PYSSIZET, offsetof(Plateau, patience), 0, "Values without improvement (0: off)."},
    {"tolerance", T_DOUBLE, offsetof(Plateau, tolerance), 0, "Relative improvement that counts."},
    {"best", T_DOUBLE, offsetof(Plateau, best), 0, "Best rolling mean so far (inf before the first)."},
    {"since", T_PYSSIZET, offsetof(Plateau, since), 0, "Values since it last improved."},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot plateau_slots[] = {
    {Py_tp_doc, "PlateauDetector(patience=1000, tolerance=0.01, smoothing=50): the C twin of "
                "otel_ml.detectors.PyPlateauDetector."},
    {Py_tp_new, plateau_new},
    {Py_tp_dealloc, stats_dealloc},
    {Py_tp_methods, plateau_methods},
    {Py_tp_members, plateau_members},
    {0, NULL},
};

/* ------------------------------------------------------------------ ExplosionDetector */

typedef struct {
    Stats base; /* first: its window, which stats_dealloc frees */
    double factor, maximum;
    Py_ssize_t warmup;
} Explosion;

static PyObject *explosion_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"factor", "maximum", "window", "warmup", NULL};
    Py_ssize_t window = 100, warmup = 20;
    double factor = 10.0, maximum = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|ddnn:ExplosionDetector", keywords, &factor, &maximum,
                                     &window, &warmup))
        return NULL;
    Explosion *self = (Explosion *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    ring_init(&self->base.ring, window);
    self->factor = factor;
    self->maximum = maximum;
    self->warmup = warmup;
    return (PyObject *)self;
}

static PyObject *explosion_observe(Explosion *self, PyObject *arg) {
    double value;
    if (as_double(arg, &value) < 0) return NULL;
    if (self->maximum > 0 && value > self->maximum) Py_RETURN_TRUE;
    Ring *ring = &self->base.ring;
    if (self->factor > 0 && ring->n >= self->warmup && value > self->factor * ring_mean(ring)) Py_RETURN_TRUE;
    if (ring_add(ring, value) < 0) return NULL;
    Py_RETURN_FALSE;
}

static PyMethodDef explosion_methods[] = {
    {"observe", (PyCFunction)explosion_observe, METH_O, "observe(value): True when value explodes."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef explosion_members[] = {
    {"factor", T_DOUBLE, offsetof(Explosion, factor), 0, "Times the rolling mean that explodes (0: off)."},
    {"maximum", T_DOUBLE, offsetof(Explosion, maximum), 0, "Absolute limit (0: none)."},
    {"warmup", T_PYSSIZET, offsetof(Explosion, warmup), 0, "Values seen before the factor counts."},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot explosion_slots[] = {
    {Py_tp_doc, "ExplosionDetector(factor=10.0, maximum=0.0, window=100, warmup=20): the C twin of "
                "otel_ml.detectors.PyExplosionDetector."},
    {Py_tp_new, explosion_new},
    {Py_tp_dealloc, stats_dealloc},
    {Py_tp_methods, explosion_methods},
    {Py_tp_members, explosion_members},
    {0, NULL},
};

/* ------------------------------------------------------------------ module */

#define SPEC(cname, type, type_slots)                                                                 \
    {.name = "otel_ml._cdetectors." cname, .basicsize = sizeof(type), .flags = Py_TPFLAGS_DEFAULT,    \
     .slots = type_slots}

static PyType_Spec specs[] = {
    SPEC("RollingStats", Stats, stats_slots),
    SPEC("SpikeDetector", Spike, spike_slots),
    SPEC("PlateauDetector", Plateau, plateau_slots),
    SPEC("ExplosionDetector", Explosion, explosion_slots),
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "otel_ml._cdetectors",
    .m_doc = "C twins of otel_ml.detectors' rolling statistics and spike, plateau and explosion detectors.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__cdetectors(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    for (size_t i = 0; i < sizeof(specs) / sizeof(specs[0]); i++) {
        PyObject *type = PyType_FromSpec(&specs[i]);
        const char *name = strrchr(specs[i].name, '.') + 1;
        if (type == NULL || PyModule_AddObject(m, name, type) < 0) {
            Py_XDECREF(type);
            Py_DECREF(m);
            return NULL;
        }
    }
    if (PyModule_AddIntConstant(m, "DETECTORS", DETECTORS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

"""``otel_ml.span(...)``: nested timed regions, cheap enough to leave on in production.

A region on the training thread records its path node, its parent and two clock reads; no OTel
span is created here: finished regions go to a queue, and the export thread aggregates them into
histograms and builds real spans, with the original timestamps, for the steps chosen for tracing
(:mod:`otel_ml.regions.aggregator`).

``__enter__``/``__exit__`` are written in C (``otel_ml/regions/_cregion.c``, built at install): about
0.2 µs in a tight loop and 5-9 µs between a step's kernels, where caches are cold, against 0.7
and 20 µs for the same region in Python (``benchmarks/bench_span.py``, ``bench_modules.py``).
:class:`PyRegion` is that Python region: the fallback when the extension is not built
(``ACCELERATED`` is then False) or ``OTEL_ML_PURE_PYTHON=1`` is set, and what TorchDynamo
traces. The tests run both.

Nesting uses a :class:`contextvars.ContextVar`, so each thread and each asyncio task has its own
stack, and a task started inside a region nests under it. When CUDA timing is on, each region
also records two CUDA events; they are resolved later with ``event.query()`` off the training
thread, never with ``synchronize()``.

Under ``torch.compile`` regions do nothing and break no graph (``fullgraph=True`` works), when
written ``with otel_ml.span(name):`` or as a decorator inside the compiled code. A region object
kept from eager code (``fwd = otel_ml.span("forward")``) and entered inside compiled code is a
context manager TorchDynamo cannot trace: a graph break there.

Over 400 lines: the Python regions, the record layout they share with the C ones and the
install/compile checks stay together, so the two implementations cannot drift apart.

Example::

    with otel_ml.span("forward"):
        with otel_ml.span("encoder"):         # path "forward/encoder"
            ...

    @otel_ml.span("data/collate")
    def collate(batch): ...
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar

from otel_ml._cbuild import extension, stale_build
from otel_ml.regions.pathtree import PathNode, PathTree, split

#: The slots of a region record, in order. A record is a list (the cheapest mutable record):
#: path node, start and end clock reads, the parent record, the context-variable token, the
#: exception type, the region object, the two CUDA events, the children's time, the GPU time.
#: ``_cregion.c`` builds the same lists; it exports its slot indices and the recorder refuses a
#: build that disagrees (:func:`layout_mismatch`).
RECORD_LAYOUT = (
    "NODE",
    "START",
    "END",
    "PARENT",
    "TOKEN",
    "ERROR",
    "REGION",
    "EV_START",
    "EV_END",
    "CHILD",
    "GPU",
)
NODE, START, END, PARENT, TOKEN, ERROR, REGION, EV_START, EV_END, CHILD, GPU = range(len(RECORD_LAYOUT))


def new_record(node: PathNode | None, parent: list | None, region: Any) -> list:
    """A record of a region about to start (its clock reads and events are filled in after)."""
    return [node, 0, None, parent, None, None, region, None, None, 0.0, None]


def layout_mismatch(module: Any) -> str | None:
    """Why the C extension ``module`` cannot share records with this module, or None if it can."""
    slots = getattr(module, "RECORD_SLOTS", None)
    if slots != len(RECORD_LAYOUT):
        return f"it has {slots} record slots, otel_ml.regions.recorder has {len(RECORD_LAYOUT)}"
    wrong = [n for i, n in enumerate(RECORD_LAYOUT) if getattr(module, n, None) != i]
    return f"slots {', '.join(wrong)} are at other indices" if wrong else None


def _load_c() -> Any:
    """The C hot path, unless disabled, missing or built with another record layout."""
    module = extension("otel_ml.regions._cregion")
    if module is None:
        return None
    problem = layout_mismatch(module)
    if problem is None:
        return module
    message = f"otel_ml.regions._cregion is a stale build ({problem}); rebuild it (pip install -e .)"
    return stale_build(message, "using the Python regions")


_cregion = _load_c()

#: True when regions run the C hot path (``otel_ml/regions/_cregion.c``), False for the Python one.
ACCELERATED = _cregion is not None

# The innermost open region of this thread or task: its entry for PyRegion; for the C regions a
# Cell holding the context's stack of open records, set once per context (see _cregion.c).
_current: ContextVar[Any] = ContextVar("otel_ml_region", default=None)
# Bound methods fetched once (the hot path calls them on every region).
_get = _current.get
_set = _current.set
_reset = _current.reset

F = TypeVar("F", bound=Callable[..., Any])

#: Finished regions waiting for the export thread at most; more are dropped and counted.
MAX_FINISHED = 1 << 18


class _NeverCompiling:
    _is_compiling_flag = False


def _fast_compiling_check() -> tuple[Callable[[], bool], Any]:
    """The compile check of the region hot path, as (call, holder of ``_is_compiling_flag``).

    ``torch.compiler.is_compiling()`` costs two Python calls per region. Its parts do the same
    with one: TorchDynamo folds ``is_dynamo_compiling()`` to True while tracing, and torch sets
    ``torch.compiler._is_compiling_flag`` for a whole compile or export session (its value is
    what ``is_compiling()`` returns in eager code). Other torch versions get ``is_compiling``.
    """
    compiler = getattr(sys.modules.get("torch"), "compiler", None)
    dynamo = getattr(compiler, "is_dynamo_compiling", None)
    if dynamo is not None and isinstance(getattr(compiler, "_is_compiling_flag", None), bool):
        return dynamo, compiler
    # ``bool()`` is False: a call written in C, for when torch is not imported at all.
    return getattr(compiler, "is_compiling", bool), _NeverCompiling


class Recorder:
    """Hot-path state shared by every region of the process (one per ``init()``).

    ``clock`` returns nanoseconds (``time.perf_counter_ns`` by default; tests pass a fake).
    ``events`` is a CUDA event pool (or a stand-in) when GPU timing is on, else None.

    Example::

        recorder = Recorder(PathTree())
        install(recorder)
    """

    def __init__(
        self,
        tree: PathTree | None = None,
        *,
        clock: Callable[[], int] = time.perf_counter_ns,
        events: Any | None = None,
        on_drop: Callable[[int], None] | None = None,
        on_error: Callable[[], None] | None = None,
        sample_every: int = 100,
        on_boundary: Sequence[Callable[[], None]] = (),
    ) -> None:
        self.tree = tree or PathTree()
        self.clock = clock
        self._events = events
        self._enabled = True
        self.explicit_steps = False
        self.finished: deque[list] = deque()
        self.boundaries: deque[tuple[int | None, int, Mapping[str, Any] | None]] = deque()
        #: The tracing interval (``trace_every``): ``trace_modules()`` times modules on the same
        #: steps by default, so each traced step shows its modules.
        self.sample_every = sample_every
        #: Called on the training thread at every step boundary (module sampling); keep them cheap.
        self.on_boundary = tuple(on_boundary)
        self._on_drop = on_drop
        #: Counts a failure inside timing that was swallowed to protect the training loop.
        self.on_error = on_error
        self._lock = threading.Lock()
        self.started_ns = clock()

    @property
    def enabled(self) -> bool:
        """False turns every region into a no-op (the recorder stays installed)."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = value
        if _recorder is self:
            install(self)

    @property
    def events(self) -> Any | None:
        """The CUDA event pool (or a stand-in) when regions record GPU time, else None."""
        return self._events

    @events.setter
    def events(self, value: Any | None) -> None:
        self._events = value
        if _recorder is self:
            install(self)

    def finish(self, entry: list) -> None:
        """Queue a finished entry made outside a region (module backward regions)."""
        if _cregion is not None:
            _cregion.finish(entry)  # behind the C regions that finished before it
            return
        finished = self.finished
        if len(finished) >= MAX_FINISHED:
            if self._on_drop is not None:
                self._on_drop(1)
            return
        finished.append(entry)

    def count_error(self) -> None:
        """Count a failure inside timing that was swallowed to protect the training loop."""
        if self.on_error is not None:
            self.on_error()

    def collect(self) -> None:
        """Move the regions the C hot path finished into ``finished`` (export thread).

        ``finished`` is bounded like the C queue: while it is full (regions waiting for their
        GPU), the C queue keeps the rest and drops, counted, beyond its own bound.
        """
        if len(self.finished) >= MAX_FINISHED:
            return
        if _cregion is not None and (_recorder is self or _recorder is None):
            dropped = _cregion.drain(self.finished)
            if dropped and self._on_drop is not None:
                self._on_drop(dropped)

    def step_end(self, step: int | None = None, values: Mapping[str, Any] | None = None) -> None:
        """Close the current step window explicitly (switches off the windows implied by log())."""
        self.explicit_steps = True
        self.boundaries.append((step, self.clock(), values))
        for callback in self.on_boundary:
            callback()

    def implied_step_end(self, step: int, mono_seconds: float, values: Mapping[str, Any]) -> None:
        """Called by ``log()`` when the step number changes, unless ``step_end()`` is in use."""
        if not self.explicit_steps:
            # Numbers only (the span attributes of a sampled step): a logged loss tensor kept here
            # would keep its autograd graph alive until the pump drains it, and free it there.
            numbers = {k: v for k, v in values.items() if v.__class__ is float or v.__class__ is int}
            self.boundaries.append((step, int(mono_seconds * 1e9), numbers))
            for callback in self.on_boundary:
                callback()


_recorder: Recorder | None = None
# The hot path reads module globals, not recorder attributes: with the step's kernels between two
# regions every attribute lookup is a cache miss (see benchmarks/bench_modules.py). install() sets
# them: the recorder when it is installed and enabled, its tree's root, its queue, its clock.
_live: Recorder | None = None
_root: PathNode | None = None
_finished: deque[list] = deque(maxlen=0)
_clock: Callable[[], int] = time.perf_counter_ns
_dynamo_compiling, _compile_state = _fast_compiling_check()
_install_lock = threading.RLock()


def compiling() -> bool:
    """True under TorchDynamo tracing and for a whole compile or export session (the answer of
    ``torch.compiler.is_compiling()``; ``PyRegion.__enter__`` inlines the same two checks)."""
    return _dynamo_compiling() or _compile_state._is_compiling_flag


def install(recorder: Recorder | None) -> None:
    """Make ``recorder`` the process-wide one (``None`` turns every region into a no-op)."""
    global _recorder, _live, _root, _finished, _clock, _dynamo_compiling, _compile_state
    with _install_lock:
        _recorder = recorder
        if recorder is None:
            _live, _root, _finished, _clock = None, None, deque(maxlen=0), time.perf_counter_ns
        else:
            _dynamo_compiling, _compile_state = _fast_compiling_check()
            _root, _finished, _clock = recorder.tree.root, recorder.finished, recorder.clock
            _live = recorder if recorder.enabled else None
            allow_under_dynamo()
        _configure_c()


def _configure_c() -> None:
    """Hand the hot-path state to the C regions (they read it from there, not from here)."""
    if _cregion is None:
        return
    native = _clock is time.perf_counter_ns and sys.platform == "linux"  # both CLOCK_MONOTONIC
    _cregion.configure(
        cvar=_current,
        recorder=_recorder,
        live=_live,
        root=_root,
        clock=None if native else _clock,
        compile_state=_compile_state,
        events=None if _recorder is None else _recorder.events,
        max_finished=MAX_FINISHED,
    )


class _RegionAPI:
    """What both region implementations share: async use, the decorator, the repr."""

    __slots__ = ()
    name: str

    async def __aenter__(self) -> Any:
        return self.__enter__()  # type: ignore[attr-defined]

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return self.__exit__(exc_type, exc, tb)  # type: ignore[attr-defined]

    def __call__(self, func: F) -> F:
        """Decorate a function or coroutine function so every call is timed as this region."""
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with self:  # type: ignore[attr-defined]
                    return await func(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if _dynamo_compiling():  # TorchDynamo cannot enter a region made outside its trace
                return func(*args, **kwargs)
            with self:  # type: ignore[attr-defined]
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"otel_ml.span({self.name!r})"


class PyRegion(_RegionAPI):
    """A named region written in Python: the fallback when the C hot path is not built, and what
    :func:`span` gives TorchDynamo to trace. Same behaviour as :class:`Region`.

    The object holds no per-call state, so one instance serves every thread and nesting level.

    Example::

        with PyRegion("forward"):
            ...
    """

    __slots__ = ("_cache", "_parts", "name", "sampled")

    def __init__(self, name: str, *, sampled: bool = False) -> None:
        self.name = name
        self._parts = split(name)
        self._cache: tuple[PathNode | None, PathNode | None] = (None, None)
        #: Timed on some steps only (``trace_modules(every=N)``): its share of step time is taken
        #: over the steps it was timed in.
        self.sampled = sampled

    def __enter__(self) -> PyRegion:
        if _dynamo_compiling():  # first: TorchDynamo then reads (and guards on) nothing of ours
            return self
        rec = _live
        if rec is None or _compile_state._is_compiling_flag:
            return self
        parent = _get()
        while parent is not None and parent[END] is not None:  # skip regions closed out of order
            parent = parent[PARENT]
        parent_node = _root if parent is None else parent[NODE]
        cache = self._cache  # one read: another thread may replace it at any time
        if cache[0] is parent_node:
            node = cache[1]
        else:
            node = rec.tree.resolve(parent_node, self._parts)
            self._cache = (parent_node, node)
        entry = new_record(node, parent, self)
        if rec.events is not None:
            entry[EV_START] = rec.events.record()
        entry[TOKEN] = _set(entry)
        entry[START] = _clock()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if _dynamo_compiling():  # TorchDynamo cannot trace the context variable
            return False
        entry = _get()
        if entry is None:
            return False
        end = _clock()
        if entry[REGION] is self and entry[END] is None:
            entry[END] = end
            try:
                _reset(entry[TOKEN])
            except ValueError:  # token from another context (a generator moved across tasks)
                _set(entry[PARENT])
        else:
            # Not on top: closed out of order (e.g. hooks); find our open entry further up.
            entry = entry[PARENT]
            while entry is not None and (entry[REGION] is not self or entry[END] is not None):
                entry = entry[PARENT]
            if entry is None:
                return False  # __enter__ did nothing (disabled, compiling, or before init)
            entry[END] = end
        entry[TOKEN] = None
        if exc_type is not None:
            entry[ERROR] = exc_type
        if entry[EV_START] is not None:  # a CUDA event marks the start: one marks the end
            rec = _recorder
            if rec is not None and rec.events is not None:
                entry[EV_END] = rec.events.record()
        finished = _finished
        if len(finished) < MAX_FINISHED:
            finished.append(entry)
        elif _recorder is not None:
            _recorder.finish(entry)  # counts the drop
        return False


if _cregion is not None:

    class Region(_cregion.RegionBase, _RegionAPI):
        """A named region: context manager (sync and async) and decorator. Get one with :func:`span`.

        ``__enter__`` and ``__exit__`` are written in C (``otel_ml/regions/_cregion.c``): between a step's
        kernels they cost 5-9 µs against :class:`PyRegion`'s 20 (``benchmarks/bench_modules.py``).
        The object holds no per-call state, so one instance serves every thread and nesting level.

        Example::

            fwd = otel_ml.span("forward")
            with fwd:
                ...
        """

        __slots__ = ()

        def __init__(self, name: str, *, sampled: bool = False) -> None:
            super().__init__(name, split(name), sampled)

else:
    Region = PyRegion  # type: ignore[misc]


#: Regions kept by :func:`span` at most; past that its cache starts again (names built from data).
SPAN_CACHE = 10_000


# Unbounded, so that a hit is a dict lookup: a bounded lru_cache also relinks its LRU list on
# every hit, which between a step's kernels costs about 2.5 us more. The body bounds it on misses.
@functools.cache
def span(name: str) -> Region:
    """The region called ``name`` (``/`` separates path levels): use with ``with`` or as a decorator.

    Regions nest: ``span("forward")`` around ``span("encoder")`` records ``forward/encoder``.
    Before ``init()``, when disabled, and under ``torch.compile`` tracing it does nothing (and
    breaks no graph: TorchDynamo bypasses the cache and sees a region it can trace).
    A name seen before costs a dict lookup written in C, not a Python call: between a
    training step's kernels that difference is microseconds (``benchmarks/bench_modules.py``).

    Example::

        with otel_ml.span("前向传播总耗时"):
            loss = model(batch)
    """
    if _dynamo_compiling():  # TorchDynamo traces this body (not the cache): give it Python
        return PyRegion(name)
    if span.cache_info().currsize >= SPAN_CACHE:
        span.cache_clear()
    return Region(name)


def allow_under_dynamo() -> bool:
    """Once TorchDynamo is imported, take torch's compile check (it may not have been imported at
    ``install()``) and tell TorchDynamo that tracing through ``span``'s cache is intended, which
    silences its warning about ``lru_cache``; True once done. Never imports torch."""
    global _dynamo_compiling, _compile_state
    utils = sys.modules.get("torch._dynamo.utils")
    allow = getattr(utils, "allow_lru_cache_wrapper_trace_without_warning", None)
    if allow is None:
        return False
    with _install_lock:  # the pump thread calls this: keep the state install() sets whole
        _dynamo_compiling, _compile_state = _fast_compiling_check()
        _configure_c()
    try:
        allow(span)
    except Exception:  # noqa: BLE001 - a private helper of torch: its absence costs a warning only
        return False
    return True


def step_end(step: int | None = None) -> None:
    """Close the current step for timing and tracing.

    ``otel_ml.log(step, ...)`` implies it whenever the step number changes; once ``step_end()``
    is called, only explicit calls close steps. No-op before ``init()``.

    Example::

        for batch in loader:
            with otel_ml.span("forward"): ...
            otel_ml.step_end()
    """
    rec = _live
    if rec is not None:
        rec.step_end(step)


#: The innermost open entry of this thread or task (it may have been closed out of order), or None.
top_entry: Callable[[], list | None] = _get if _cregion is None else _cregion.top


def current_path() -> str | None:
    """The path of the innermost open region in this thread or task, or None."""
    entry = top_entry()
    while entry is not None and entry[END] is not None:
        entry = entry[PARENT]
    return None if entry is None else entry[NODE].path


def record(name: str, seconds: float, children: Mapping[str, float] | None = None) -> None:
    """Record a region of ``seconds`` that ended now, timed by someone else (a framework's timer,
    such as verl's ``timing_s/*``); it nests under the caller's open region, if any. ``children``
    (name -> seconds) are recorded as its child regions, ending when it ends, so that its self
    time excludes them.

    No-op before ``init()``; negative or non-finite durations are skipped.

    Example::

        otel_ml.regions.record("step", 3.1, {"gen": 1.7, "update_actor": 0.9})  # path step/gen, ...
    """
    rec = _live
    if rec is None or not 0.0 <= seconds < float("inf"):
        return
    parent = top_entry()
    while parent is not None and parent[END] is not None:
        parent = parent[PARENT]
    end = rec.clock()
    entry = _recorded(rec, name, seconds, parent, end)
    for child, child_seconds in (children or {}).items():
        if 0.0 <= child_seconds < float("inf"):
            rec.finish(_recorded(rec, child, child_seconds, entry, end))  # before the parent: self time
    rec.finish(entry)


def _recorded(rec: Recorder, name: str, seconds: float, parent: list | None, end: int) -> list:
    node = rec.tree.resolve(rec.tree.root if parent is None else parent[NODE], split(name))
    entry = new_record(node, parent, _RECORDED)
    entry[START], entry[END] = end - int(seconds * 1e9), end
    return entry


class _Recorded:
    """The region object of the entries :func:`record` makes (never sampled)."""

    __slots__ = ()
    sampled = False
    name = "(recorded)"


_RECORDED = _Recorded()

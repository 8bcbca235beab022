"""``trace_modules(model, depth=2)``: time every ``nn.Module`` up to a depth, forward and backward.

Forward: while modules are timed, each traced module's ``forward`` is shadowed by an instance
attribute that opens the module's region, calls the real forward and closes the region (also
when it raises); regions nest like the modules, under whatever ``otel_ml.span`` is open
(``forward/model/encoder/layers.0``). Module hooks could do the same, but any hook sends every
call through PyTorch's slow hook path (about 3 µs more per call here, with no-op hooks); the
attribute costs one Python call. It sees keyword inputs too.

Backward: full module backward hooks wrap outputs in a custom autograd Function, which makes a
later in-place op on them (``ReLU(inplace=True)``) raise, so they could break training. Instead,
the forward wrapper registers hooks on autograd nodes: the module's backward region opens when
the node that produced its output starts (``grad_fn`` pre-hook) and closes when gradients reach
the nodes that produced its inputs (their pre-hooks); when no input needs a gradient, when the
output node finishes (a leaf module) or when the backward pass ends (a module with traced
children). Backward regions nest by module tree under ``<root>.backward``, which itself nests
under the region open on the thread running backward (``backward/model.backward/encoder`` when
``loss.backward()`` runs inside ``otel_ml.span("backward")`` on CPU; CUDA autograd runs on its
own threads, where the path starts at ``model.backward``).

In a real training loop a timed module call costs 30-60 µs (its Python runs with caches the
step's kernels have evicted), so by default modules are timed on the steps chosen for tracing
(``every=trace_every``, 100 unless configured): each traced step shows its modules, and between
timed steps the attributes are removed and the model runs exactly as if it were not traced.

Over 400 lines: the forward swap, the backward hooks and their removal share per-module
state; split over files, the install/restore invariants would be too.

Example::

    handle = otel_ml.trace_modules(model, depth=2)
    ...
    handle.remove()
"""

from __future__ import annotations

import functools
import types
import weakref
from collections.abc import Callable
from typing import Any

from otel_ml._logging import warn_once
from otel_ml.regions import recorder as timing
from otel_ml.regions.pathtree import PathNode, split
from otel_ml.regions.recorder import END, EV_END, EV_START, NODE, PARENT, START, Region
from otel_ml.values import tensor_type


def _nodes(value: Any, tensor: type, limit: int = 8) -> tuple[Any, ...]:
    """The distinct autograd nodes (see :func:`_node_of`) of the tensors in a module's inputs or
    outputs: tensors, tuples, lists and dict values, looking at ``limit`` tensors at most."""
    nodes: list[Any] = []
    stack = [value]
    seen = 0
    while stack and seen < limit:
        item = stack.pop()
        if isinstance(item, tensor):
            seen += 1
            node = _node_of(item)
            if node is not None and node not in nodes:
                nodes.append(node)
        elif isinstance(item, (tuple, list)):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            stack.extend(item.values())
    return tuple(nodes)


def _queue_end_of_backward(callback: Any) -> None:
    import torch

    torch.autograd.Variable._execution_engine.queue_callback(callback)


def _node_of(tensor: Any) -> Any:
    """The autograd node whose run marks a tensor's backward, or None when it needs no gradient.

    An in-place op on a view (``ReLU(inplace=True)`` after a ``Linear`` on 3-d input) replaces
    the view's node in the graph, but the node of the view's base always runs, right after the
    view's own (cheap) node: it is the one hooked.
    """
    node = tensor.grad_fn
    if node is not None:
        base = tensor._base
        if base is not None:
            return base.grad_fn or node
    return node


class _Backward:
    """One module call's backward region, opened and closed from autograd node hooks."""

    __slots__ = ("end_with_pass", "entry", "module", "started")

    def __init__(self, module: _TracedModule, end_with_pass: bool = False) -> None:
        self.module = module
        self.entry: list | None = None
        self.end_with_pass = end_with_pass
        self.started = False

    def start(self, *_: Any) -> None:
        if not self.started:
            self.started = True
            self.entry = self.module.open_backward()
            if self.end_with_pass and self.entry is not None:
                _queue_end_of_backward(self.stop)

    def stop(self, *_: Any) -> None:
        entry, self.entry = self.entry, None
        if entry is not None and entry[END] is None:
            self.module.close_backward(entry)


class _NodeHooks:
    """The one pre-hook otel_ml puts on an autograd node: ends and starts module regions.

    A node is often both the output of one module and the input of the next, so when it is
    about to run, the consumer's backward ends and the producer's begins: stops run first.
    Nested modules often share their output node (a Sequential returns its last layer's
    output); wrappers return inner module first, so an outer module's start is put in front.
    """

    __slots__ = ("starts", "stops")

    def __init__(self) -> None:
        self.starts: list[_Backward] = []
        self.stops: list[_Backward] = []

    def __call__(self, *_: Any) -> None:
        try:
            for backward in self.stops:
                backward.stop()
            for backward in self.starts:
                backward.start()
        except Exception as exc:  # noqa: BLE001 - raising here would abort the user's backward()
            _internal_error(exc)


def _internal_error(exc: Exception) -> None:
    """A failure inside module timing: counted, logged once, never raised into forward or backward."""
    rec = timing._recorder
    if rec is not None:
        rec.count_error()
    warn_once("modules-internal", "otel_ml: module timing failed (%r); training continues", exc)


def _timed_forward(traced: _TracedModule) -> Callable[..., Any]:
    """The function bound to a module as its ``forward`` while the module is timed."""
    region = traced.region

    def forward(module: Any, *args: Any, **kwargs: Any) -> Any:
        inner = traced.inner
        if inner is None or traced.ref() is not module:  # a deepcopy made while timed carries this
            inner = type(module).forward.__get__(module)
        if timing.compiling() or traced.live is not module or timing._live is None:
            return inner(*args, **kwargs)  # untimed: a copy, a removed tracer, torch.compile tracing
        region.__enter__()
        try:
            output = inner(*args, **kwargs)
        except BaseException as exc:
            region.__exit__(exc.__class__, exc, exc.__traceback__)
            raise
        region.__exit__(None, None, None)
        if traced.tracer.backward:
            try:
                traced.hook_backward(args, kwargs, output)
            except Exception as exc:  # noqa: BLE001 - the forward already ran: never fail it
                _internal_error(exc)
        return output

    return forward


class _TracedModule:
    """One traced module: its region, its ``forward`` wrapper and its open backward regions.

    Only a weak reference to the module is kept while it is not timed, so tracing never keeps
    a model alive by itself.
    """

    def __init__(self, tracer: ModuleTracer, module: Any, name: str, parent: _TracedModule | None) -> None:
        self.tracer = tracer
        self.parent = parent
        self.level = 0 if parent is None else parent.level + 1
        self.has_children = False
        if parent is not None:
            parent.has_children = True
        self.region = Region(name, sampled=tracer.every > 1)
        self.backward_parts = split(name if parent is not None else f"{name}.backward")
        self._backward_node: tuple[Any, PathNode] | None = None
        #: Open backward entries, innermost last. list.append/remove/[-1] are atomic under the
        #: GIL, which is all the autograd threads need here.
        self.open_entries: list[list] = []
        self.ref = weakref.ref(module)
        self.live: Any = None  # the module while the wrapper is installed, else None
        self.inner: Any = None  # an instance-level forward found when installing (other tools)
        self.installed: Any = None
        self.detached = False
        self.func = _timed_forward(self)
        functools.update_wrapper(self.func, type(module).forward)

    # forward -----------------------------------------------------------
    def install(self) -> None:
        module = self.ref()
        if module is None or self.live is module or self.detached:
            return
        attrs = module.__dict__
        self.inner = attrs.get("forward")
        self.installed = attrs["forward"] = types.MethodType(self.func, module)
        self.live = module

    def uninstall(self) -> None:
        module, self.live = self.live, None
        if module is None:
            return
        attrs = module.__dict__
        if attrs.get("forward") is not self.installed:
            # Replaced since by another tool, whose wrapper may call ours: keep delegating to
            # what was below, and never install again (ours would end up calling itself).
            self.detached = True
            return
        if self.inner is None:
            del attrs["forward"]
        else:
            attrs["forward"] = self.inner
        self.installed = self.inner = None

    def hook_backward(self, args: tuple, kwargs: dict, output: Any) -> None:
        tensor = self.tracer.tensor
        if output.__class__ is tensor:  # the common case, without walking containers
            node = _node_of(output)
            if node is None:
                return
            outs: tuple[Any, ...] = (node,)
        else:
            outs = _nodes(output, tensor)
            if not outs:
                return
        if not kwargs and len(args) == 1 and args[0].__class__ is tensor:
            node = _node_of(args[0])
            ins: tuple[Any, ...] = () if node is None else (node,)
        else:
            ins = _nodes((args, kwargs) if kwargs else args, tensor)
        # Without inputs that need gradients (the model's root, an embedding), a module's
        # backward ends when its output node finishes (a leaf module) or when the backward
        # pass ends (a module with traced children, which run after its output node).
        backward = _Backward(self, end_with_pass=not ins and self.has_children)
        leaf_without_inputs = not ins and not self.has_children
        tracer = self.tracer
        for node in outs:
            _hooks_for(tracer, node).starts.insert(0, backward)
            if leaf_without_inputs:
                node.register_hook(backward.stop)
        for node in ins:
            _hooks_for(tracer, node).stops.append(backward)

    # backward ----------------------------------------------------------
    def _node(self, rec: Any, parent: list | None) -> PathNode:
        parent_node = parent[NODE] if parent is not None else rec.tree.root
        cached = self._backward_node
        if cached is not None and cached[0] is parent_node:
            return cached[1]
        node = rec.tree.resolve(parent_node, self.backward_parts)
        self._backward_node = (parent_node, node)
        return node

    def open_backward(self) -> list | None:
        rec = timing._live
        if rec is None:
            return None
        parent = None
        if self.parent is not None:
            try:  # noqa: SIM105 - try costs nothing here; suppress() would cost a call per hook
                parent = self.parent.open_entries[-1]
            except IndexError:  # none open, or closed meanwhile on another thread
                pass
        if parent is None:
            # The outermost module: nest under the caller's open region when backward runs on
            # the calling thread (CPU autograd), e.g. otel_ml.span("backward") around it.
            parent = timing.top_entry()
            while parent is not None and parent[END] is not None:
                parent = parent[PARENT]
        entry = timing.new_record(self._node(rec, parent), parent, self.region)
        if rec.events is not None:
            entry[EV_START] = rec.events.record()
        entry[START] = rec.clock()
        self.open_entries.append(entry)
        return entry

    def close_backward(self, entry: list) -> None:
        rec = timing._recorder
        if rec is None:
            return
        entry[END] = rec.clock()
        if rec.events is not None and entry[EV_START] is not None:
            entry[EV_END] = rec.events.record()
        try:  # noqa: SIM105 - as above
            self.open_entries.remove(entry)
        except ValueError:  # dropped at the step boundary meanwhile
            pass
        rec.finish(entry)


class ModuleTracer:
    """What :func:`trace_modules` set up; ``remove()`` restores every module.

    With ``every=1`` the traced modules keep their timed ``forward`` until ``remove()``. With
    ``every=N > 1`` it is put on for the steps that are timed and taken off for the others, so
    untimed steps run the model untouched.

    Example::

        tracer = trace_modules(model, depth=1)
        tracer.paths()  # ['TinyLM', 'encoder', ...]
    """

    def __init__(self, backward: bool, every: int) -> None:
        self.backward = backward
        self.every = max(1, every)
        self.active = False
        self.tensor = tensor_type()
        self.modules: dict[str, _TracedModule] = {}
        #: Hooked autograd nodes of this step, by id (the node is kept so the id stays unique).
        self.node_hooks: dict[int, tuple[Any, _NodeHooks]] = {}
        self._steps = 0

    def on_step(self) -> None:
        """Called at each step boundary: forget the step's nodes; time every ``every``-th step.

        A backward region whose closing node never ran (a pruned graph, an in-place op that
        replaced it) is dropped here rather than left open. The step's autograd nodes are freed
        by the export thread (:func:`release_nodes`), not here on the training thread.
        """
        if self.node_hooks:
            _retired.append(self.node_hooks)
            self.node_hooks = {}
            for module in self.modules.values():
                if module.open_entries:
                    module.open_entries.clear()
        if self.every > 1:
            self._steps += 1
            self._set_active(self._steps % self.every == 0)

    def _set_active(self, active: bool) -> None:
        if active != self.active:
            self.active = active
            for module in self.modules.values():
                if active:
                    module.install()
                else:
                    module.uninstall()

    def remove(self) -> None:
        """Restore every module's own ``forward``; later steps are not timed."""
        _tracers.discard(self)
        self._set_active(False)
        self.every = 0  # a step boundary racing with remove() must not install again

    def paths(self) -> list[str]:
        """Module names in tracing order (qualified, ``.``-separated as in ``named_modules``)."""
        return list(self.modules)


_tracers: set[ModuleTracer] = set()
_retired: list[dict] = []
#: Module classes that are never called themselves; their children take their name as a prefix.
_CONTAINERS = frozenset({"ModuleList", "ModuleDict", "ParameterList", "ParameterDict"})


def _hooks_for(tracer: ModuleTracer, node: Any) -> _NodeHooks:
    known = tracer.node_hooks.get(id(node))
    if known is None or known[0] is not node:
        known = tracer.node_hooks[id(node)] = (node, _NodeHooks())
        node.register_prehook(known[1])
    return known[1]


def trace_modules(
    model: Any,
    depth: int | None = 2,
    *,
    backward: bool = True,
    every: int | None = None,
    name: str | None = None,
) -> ModuleTracer:
    """Time ``model`` and its submodules down to ``depth`` levels (None: all), forward and backward.

    The root region is named ``name`` (default: the model's class name); submodules use their
    attribute names, so paths look like ``TinyLM/encoder/layers.0``. Modules are timed on every
    ``every``-th step (default: the tracing interval ``trace_every``, 100 unless configured, so
    steps 100, 200, ... and not the warm-up step 0): a timed module call costs tens of
    microseconds in a training loop, and untimed steps run the model untouched. No-op under
    ``torch.compile`` tracing and before ``init()``; a model returned by ``torch.compile`` is
    not traced (one warning): time the compiled call with ``otel_ml.span`` instead.

    Example::

        otel_ml.trace_modules(model, depth=2)            # on the traced steps (every 100th)
        otel_ml.trace_modules(model, depth=None, every=1)  # all modules, every step
    """
    if every is None:
        rec = timing._recorder
        every = rec.sample_every if rec is not None else 100
    tracer = ModuleTracer(backward, every)
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        # Switching a compiled module's attributes every N steps would recompile it each time.
        warn_once("trace-compiled", "otel_ml: trace_modules() skips a torch.compile'd model; use span()")
        return tracer
    root_name = name or type(model).__name__
    traced: dict[str, _TracedModule] = {}
    for qualified, module in model.named_modules():
        if qualified and type(module).__name__ in _CONTAINERS:
            continue  # never called itself: its children are named "layers.0" under the caller
        parent_name = qualified.rpartition(".")[0] if qualified else ""
        while parent_name and parent_name not in traced:
            parent_name = parent_name.rpartition(".")[0]
        parent = traced.get(parent_name) if qualified else None
        level = 0 if parent is None else parent.level + 1
        if depth is not None and level > depth:
            continue
        local = qualified[len(parent_name) + 1 :] if parent_name else qualified
        item = _TracedModule(tracer, module, local if qualified else root_name, parent)
        traced[qualified] = item
        tracer.modules[qualified or root_name] = item
    _tracers.add(tracer)
    # With sampling, the first step (warm-up: lazy init, allocator, autotuning) is not timed: it
    # would skew the module percentiles and shares. Without sampling, every step is.
    tracer._set_active(tracer.every == 1)
    return tracer


def step_boundary() -> None:
    """Tell every module tracer a step ended (on the training thread, from log()/step_end())."""
    if _tracers:  # no set copy on every step of a run that traces no modules
        for tracer in tuple(_tracers):
            tracer.on_step()


def release_nodes() -> None:
    """Drop the autograd nodes of finished steps (export thread: freeing a graph takes time)."""
    while _retired:
        _retired.pop()

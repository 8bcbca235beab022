"""``trace_modules(model, depth=2)``: time every ``nn.Module`` up to a depth, forward and backward.

Forward: a pre-hook opens the module's region and a forward hook (``always_call=True``, so it
also runs when forward raises) closes it; regions nest like the modules, under whatever
``otel_ml.span`` is open (``forward/model/encoder/layers.0``).

Backward: full module backward hooks wrap outputs in a custom autograd Function, which makes a
later in-place op on them (``ReLU(inplace=True)``) raise, so they could break training. Instead,
the forward hook registers hooks on autograd nodes: the module's backward region opens when the
node that produced its output starts (``grad_fn`` pre-hook) and closes when gradients reach the
nodes that produced its inputs (their pre-hooks); when no input needs a gradient, when the
output node finishes (a leaf module) or when the backward pass ends (a module with traced
children). Backward regions nest by module tree under ``<root>.backward``, which itself nests
under the region open on the thread running backward (``backward/model.backward/encoder`` when
``loss.backward()`` runs inside ``otel_ml.span("backward")`` on CPU; CUDA autograd runs on its
own threads, where the path starts at ``model.backward``).

Hooks cost tens of microseconds per module call in a real loop (forward and backward, with cold
caches), so by default modules are timed on every 20th step (``every=20``): between timed steps
no hook is installed at all.

Example::

    handle = otel_ml.trace_modules(model, depth=2)
    ...
    handle.remove()
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from otel_ml import timing
from otel_ml.paths import PathNode, split
from otel_ml.timing import END, EV_END, EV_START, NODE, PARENT, START, Region
from otel_ml.values import tensor_type


def _tensors(value: Any, limit: int = 8) -> Iterator[Any]:
    """Tensors in a module's inputs/outputs (tensors, tuples, lists, dict values), at most ``limit``."""
    stack = [value]
    found = 0
    while stack and found < limit:
        item = stack.pop()
        if hasattr(item, "grad_fn") and hasattr(item, "requires_grad"):
            found += 1
            yield item
        elif isinstance(item, (tuple, list)):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            stack.extend(item.values())


def _queue_end_of_backward(callback: Any) -> None:
    import torch

    torch.autograd.Variable._execution_engine.queue_callback(callback)


def _node_of(tensor: Any) -> Any:
    """The autograd node whose run marks a tensor's backward.

    An in-place op on a view (``ReLU(inplace=True)`` after a ``Linear`` on 3-d input) replaces
    the view's node in the graph, but the node of the view's base always runs, right after the
    view's own (cheap) node: it is the one hooked.
    """
    base = tensor._base
    if base is not None and base.grad_fn is not None:
        return base.grad_fn
    return tensor.grad_fn


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
    output); forward hooks run inner module first, so an outer module's start is put in front.
    """

    __slots__ = ("starts", "stops")

    def __init__(self) -> None:
        self.starts: list[_Backward] = []
        self.stops: list[_Backward] = []

    def __call__(self, *_: Any) -> None:
        for backward in self.stops:
            backward.stop()
        for backward in self.starts:
            backward.start()


class _TracedModule:
    def __init__(self, tracer: ModuleTracer, name: str, parent: _TracedModule | None) -> None:
        self.tracer = tracer
        self.parent = parent
        self.level = 0 if parent is None else parent.level + 1
        self.has_children = False
        if parent is not None:
            parent.has_children = True
        self.region = Region(name)
        self.backward_parts = split(name if parent is not None else f"{name}.backward")
        self._backward_node: tuple[Any, PathNode] | None = None
        self.open_entries: list[list] = []  # open backward entries, innermost last
        self.lock = threading.Lock()

    # forward -----------------------------------------------------------
    def pre(self, module: Any, args: Any) -> None:
        if self.tracer.active:
            self.region.__enter__()

    def post(self, module: Any, args: Any, output: Any) -> None:
        if not self.tracer.active:
            return
        self.region.__exit__(None, None, None)
        rec = timing._recorder
        if self.tracer.backward and rec is not None and rec.enabled and not rec.is_compiling():
            self._hook_backward(args, output)

    def _hook_backward(self, args: Any, output: Any) -> None:
        tracer = self.tracer
        if output.__class__ is tensor_type() and output.grad_fn is not None:
            outs = [_node_of(output)]  # the common case, without walking containers
        else:
            found = (_node_of(t) for t in _tensors(output) if t.grad_fn is not None)
            outs = list({id(n): n for n in found}.values())
        if not outs:
            return
        ins = {id(n): n for n in (_node_of(t) for t in _tensors(args) if t.grad_fn is not None)}
        # Without inputs that need gradients (the model's root, an embedding), a module's
        # backward ends when its output node finishes (a leaf module) or when the backward
        # pass ends (a module with traced children, which run after its output node).
        backward = _Backward(self, end_with_pass=not ins and self.has_children)
        leaf_without_inputs = not ins and not self.has_children
        for node in outs:
            _hooks_for(tracer, node).starts.insert(0, backward)
            if leaf_without_inputs:
                node.register_hook(backward.stop)
        for node in ins.values():
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
        rec = timing._recorder
        if rec is None or not rec.enabled:
            return None
        parent = None
        if self.parent is not None:
            with self.parent.lock:
                if self.parent.open_entries:
                    parent = self.parent.open_entries[-1]
        if parent is None:
            # The outermost module: nest under the caller's open region when backward runs on
            # the calling thread (CPU autograd), e.g. otel_ml.span("backward") around it.
            parent = timing._get()
            while parent is not None and parent[END] is not None:
                parent = parent[PARENT]
        entry = [self._node(rec, parent), 0, None, parent, None, None, self.region, None, None, 0.0, None]
        if rec.events is not None:
            entry[EV_START] = rec.events.record()
        entry[START] = rec.clock()
        with self.lock:
            self.open_entries.append(entry)
        return entry

    def close_backward(self, entry: list) -> None:
        rec = timing._recorder
        if rec is None:
            return
        entry[END] = rec.clock()
        if rec.events is not None and entry[EV_START] is not None:
            entry[EV_END] = rec.events.record()
        with self.lock:
            if entry in self.open_entries:
                self.open_entries.remove(entry)
        rec.finish(entry)


class ModuleTracer:
    """Hooks installed by :func:`trace_modules`; ``remove()`` takes them all off.

    With ``every=1`` each traced module carries its own forward hooks. With ``every=N > 1`` two
    process-wide module hooks are installed only for the steps that are timed and removed for
    the others, so untimed steps run with no hook at all.

    Example::

        tracer = trace_modules(model, depth=1)
        tracer.paths()  # ['TinyLM', 'encoder', ...]
    """

    def __init__(self, backward: bool, every: int) -> None:
        self.backward = backward
        self.every = max(1, every)
        self.active = True
        self.handles: list[Any] = []
        self.modules: dict[str, _TracedModule] = {}
        self.by_module: dict[int, _TracedModule] = {}
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
                with module.lock:
                    module.open_entries.clear()
        if self.every > 1:
            self._steps += 1
            active = self._steps % self.every == 0
            if active != self.active:
                self.active = active
                _update_global_hooks()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        _tracers.discard(self)
        _update_global_hooks()

    def paths(self) -> list[str]:
        """Module names in hook order (qualified, ``.``-separated as in ``named_modules``)."""
        return list(self.modules)


_tracers: set[ModuleTracer] = set()
_retired: list[dict] = []
_global_handles: list[Any] = []
#: Module classes that are never called themselves; their children take their name as a prefix.
_CONTAINERS = frozenset({"ModuleList", "ModuleDict", "ParameterList", "ParameterDict"})


def _hooks_for(tracer: ModuleTracer, node: Any) -> _NodeHooks:
    known = tracer.node_hooks.get(id(node))
    if known is None or known[0] is not node:
        known = tracer.node_hooks[id(node)] = (node, _NodeHooks())
        node.register_prehook(known[1])
    return known[1]


def _global_pre(module: Any, args: Any) -> None:
    for tracer in _tracers:
        if tracer.every > 1 and tracer.active:
            item = tracer.by_module.get(id(module))
            if item is not None:
                item.pre(module, args)


def _global_post(module: Any, args: Any, output: Any) -> None:
    for tracer in _tracers:
        if tracer.every > 1 and tracer.active:
            item = tracer.by_module.get(id(module))
            if item is not None:
                item.post(module, args, output)


def _update_global_hooks() -> None:
    """Install the process-wide hooks while a sampled tracer times a step, remove them otherwise."""
    wanted = any(t.every > 1 and t.active for t in _tracers)
    if wanted and not _global_handles:
        from torch.nn.modules import module as torch_module

        _global_handles.append(torch_module.register_module_forward_pre_hook(_global_pre))
        _global_handles.append(torch_module.register_module_forward_hook(_global_post, always_call=True))
    elif not wanted and _global_handles:
        for handle in _global_handles:
            handle.remove()
        _global_handles.clear()


def trace_modules(
    model: Any, depth: int | None = 2, *, backward: bool = True, every: int = 20, name: str | None = None
) -> ModuleTracer:
    """Time ``model`` and its submodules down to ``depth`` levels (None: all), forward and backward.

    The root region is named ``name`` (default: the model's class name); submodules use their
    attribute names, so paths look like ``TinyLM/encoder/layers.0``. Modules are timed on every
    ``every``-th step (default 20; the first step is timed): hooks cost tens of microseconds per
    module call in a real loop (forward and backward), and untimed steps carry none. No-op under
    ``torch.compile`` tracing and before ``init()``.

    Example::

        otel_ml.trace_modules(model, depth=2)            # every 20th step
        otel_ml.trace_modules(model, depth=None, every=1)  # all modules, every step
    """
    tracer = ModuleTracer(backward, every)
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
        item = _TracedModule(tracer, local if qualified else root_name, parent)
        traced[qualified] = item
        tracer.modules[qualified or root_name] = item
        tracer.by_module[id(module)] = item
        if tracer.every == 1:
            tracer.handles.append(module.register_forward_pre_hook(item.pre))
            tracer.handles.append(module.register_forward_hook(item.post, always_call=True))
    _tracers.add(tracer)
    _update_global_hooks()
    return tracer


def step_boundary() -> None:
    """Tell every module tracer a step ended (on the training thread, from log()/step_end())."""
    for tracer in tuple(_tracers):
        tracer.on_step()


def release_nodes() -> None:
    """Drop the autograd nodes of finished steps (export thread: freeing a graph takes time)."""
    while _retired:
        _retired.pop()

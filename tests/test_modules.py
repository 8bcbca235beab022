"""trace_modules on a real small model: forward and backward paths, sampling, safety."""

from __future__ import annotations

import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider
from torch import nn

import otel_ml
from otel_ml import runtime
from otel_ml.regions import module_tracing as modules
from otel_ml.regions import recorder as timing
from otel_ml.regions.aggregator import Aggregator
from otel_ml.regions.pathtree import PathTree
from otel_ml.regions.sampling import TraceSampler


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.attn(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


@pytest.fixture
def aggregator():
    recorder = timing.Recorder(PathTree(), on_boundary=(modules.step_boundary,))
    agg = Aggregator(
        recorder, TracerProvider(shutdown_on_exit=False).get_tracer("t"), {}, sampler=TraceSampler(0, 0)
    )
    timing.install(recorder)
    yield agg
    timing.install(None)


def _train(net: Net, steps: int, recorder: timing.Recorder) -> list[float]:
    torch.manual_seed(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randint(0, 10, (4, 5))
    y = torch.randint(0, 10, (4, 5))
    losses = []
    for step in range(steps):
        with otel_ml.span("forward"):
            loss = nn.functional.cross_entropy(net(x).reshape(-1, 10), y.reshape(-1))
        with otel_ml.span("backward"):
            opt.zero_grad()
            loss.backward()
        opt.step()
        losses.append(loss.item())
        recorder.step_end(step)
    return losses


def _counts(agg: Aggregator) -> dict[str, int]:
    agg.process()
    return {n.path: s.count for n, s in agg.stats.items()}


def test_forward_and_backward_paths_follow_the_module_tree(aggregator):
    net = Net()
    tracer = otel_ml.trace_modules(net, depth=2, every=1)
    assert tracer.paths() == [
        "Net",
        "embed",
        "blocks.0",
        "blocks.0.attn",
        "blocks.0.mlp",
        "blocks.1",
        "blocks.1.attn",
        "blocks.1.mlp",
        "head",
    ]
    _train(net, 3, aggregator.recorder)
    counts = _counts(aggregator)
    modules = [
        "embed",
        "blocks.0",
        "blocks.0/attn",
        "blocks.0/mlp",
        "blocks.1",
        "blocks.1/attn",
        "blocks.1/mlp",
        "head",
    ]
    expected = {"forward": 3, "backward": 3, "forward/Net": 3, "backward/Net.backward": 3}
    expected.update({f"forward/Net/{m}": 3 for m in modules})
    expected.update({f"backward/Net.backward/{m}": 3 for m in modules})
    assert counts == expected
    tracer.remove()


def test_backward_regions_nest_and_fit_inside_the_backward_pass(aggregator):
    net = Net()
    tracer = otel_ml.trace_modules(net, depth=1, every=1)
    _train(net, 2, aggregator.recorder)
    aggregator.process()
    stats = {n.path: s for n, s in aggregator.stats.items()}
    root = stats["backward/Net.backward"]
    children = [s for p, s in stats.items() if p.startswith("backward/Net.backward/")]
    assert root.total <= stats["backward"].total
    assert sum(c.total for c in children) <= root.total + 1e-9
    tracer.remove()


def test_all_depths_with_inplace_relu_still_trains(aggregator):
    torch.manual_seed(1)
    baseline = _train(Net(), 5, aggregator.recorder)
    torch.manual_seed(1)
    net = Net()
    tracer = otel_ml.trace_modules(net, depth=None, every=1)
    traced = _train(net, 5, aggregator.recorder)
    assert traced == pytest.approx(baseline)  # same numbers with the hooks on
    counts = _counts(aggregator)
    assert counts["forward/Net/blocks.0/mlp/0"] == 5
    assert counts["backward/Net.backward/blocks.0/mlp/0"] == 5
    tracer.remove()


def test_every_n_times_modules_on_every_nth_step_only(aggregator):
    net = Net()
    tracer = otel_ml.trace_modules(net, depth=1, every=2)
    _train(net, 7, aggregator.recorder)  # steps 2, 4 and 6 are timed; step 0 is warm-up
    counts = _counts(aggregator)
    assert counts["forward"] == 7
    assert counts["forward/Net/head"] == 3
    assert counts["backward/Net.backward/head"] == 3
    tracer.remove()


def _timed(net: nn.Module) -> list[str]:
    """Names of the modules whose forward is currently shadowed by otel_ml."""
    return [name for name, m in net.named_modules() if "forward" in vars(m)]


def test_remove_restores_every_module_untouched(aggregator):
    net = Net()
    tracer = otel_ml.trace_modules(net, depth=None, every=1)
    assert len(_timed(net)) == len(tracer.paths())
    tracer.remove()
    _train(net, 2, aggregator.recorder)
    assert set(_counts(aggregator)) == {"forward", "backward"}
    assert _timed(net) == []
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_by_default_modules_are_touched_on_the_traced_steps_only(aggregator):
    aggregator.recorder.sample_every = 20  # what init() sets from trace_every
    net = Net()
    tracer = otel_ml.trace_modules(net, depth=1)
    assert tracer.every == 20
    installed = []
    for _ in range(41):
        installed.append(bool(_timed(net)))
        _train(net, 1, aggregator.recorder)  # one step, closed by step_end
    assert [i for i, on in enumerate(installed) if on] == [20, 40]  # step 0 is warm-up
    assert _counts(aggregator)["forward/Net/head"] == 2
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())  # no hook at all
    tracer.remove()
    assert _timed(net) == []


def test_keyword_inputs_end_the_backward_region_of_their_module(aggregator):
    class Scale(nn.Module):
        def forward(self, *, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    class KwNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 4)
            self.scale = Scale()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scale(x=torch.tanh(self.inp(x)))

    net = KwNet()
    tracer = otel_ml.trace_modules(net, depth=1, every=1)
    for step in range(2):
        net(torch.randn(3, 4)).sum().backward()
        aggregator.recorder.step_end(step)
    aggregator.process()
    stats = {n.path: s for n, s in aggregator.stats.items()}
    # The tanh between the modules is nobody's backward: Scale's region ends where tanh's begins.
    assert stats["KwNet.backward/scale"].count == 2
    assert stats["KwNet.backward/scale"].total < stats["KwNet.backward"].total
    tracer.remove()


def test_the_timed_forward_keeps_the_signature_of_the_real_one(aggregator):
    import inspect

    net = Net()
    tracer = otel_ml.trace_modules(net, depth=1, every=1)
    assert "forward" in vars(net.head)
    assert inspect.signature(net.head.forward) == inspect.signature(nn.Linear(1, 1).forward)
    tracer.remove()


def test_a_deepcopy_made_while_timed_runs_its_own_weights_untimed(aggregator):
    import copy

    net = Net()
    tracer = otel_ml.trace_modules(net, depth=1, every=1)
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.head.bias.add_(1.0)
    x = torch.randint(0, 10, (2, 3))
    assert torch.allclose(twin(x), net(x) + 1.0)  # the copy calls its own forward, not net's
    counts = _counts(aggregator)
    assert counts["Net"] == 1 and counts["Net/head"] == 1  # one call of net; none of the copy
    tracer.remove()


def test_a_model_pickled_while_timed_loads_and_runs_untimed(aggregator):
    import pickle

    net = Net()
    tracer = otel_ml.trace_modules(net, depth=1, every=1)
    loaded = pickle.loads(pickle.dumps(net))  # torch.save(model) pickles the whole module
    x = torch.randint(0, 10, (2, 3))
    assert torch.allclose(loaded(x), net(x))
    assert _counts(aggregator)["Net"] == 1  # only net's own call
    tracer.remove()


def test_a_forward_replaced_by_another_tool_meanwhile_is_left_in_place(aggregator):
    net = Net()
    tracer = otel_ml.trace_modules(net, depth=1, every=2)
    _train(net, 2, aggregator.recorder)  # steps 0 and 1 are untimed; step 2 is timed
    ours = net.head.forward
    assert "forward" in vars(net.head)
    calls = []

    def theirs(*args, **kwargs):
        calls.append(1)
        return ours(*args, **kwargs)

    net.head.forward = theirs
    _train(net, 5, aggregator.recorder)  # steps 2 to 6: timed and untimed alternate
    assert net.head.forward is theirs and len(calls) == 5
    tracer.remove()
    assert _counts(aggregator)["forward/Net/head"] == 1  # timed once, then detached for good


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing torch._dynamo warns
def test_a_compiled_model_is_not_traced_and_says_so(aggregator, caplog):
    net = Net()
    compiled = torch.compile(net)  # compiles lazily, on the first call: never called here
    tracer = otel_ml.trace_modules(compiled, depth=1)
    assert tracer.paths() == []
    assert _timed(net) == []
    assert "torch.compile" in caplog.text
    tracer.remove()


def test_tracing_does_not_keep_an_untimed_model_alive(aggregator):
    import gc
    import weakref

    net = Net()
    tracer = otel_ml.trace_modules(net, depth=None)
    _train(net, 1, aggregator.recorder)  # the next step is untimed: attributes are off
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None
    tracer.remove()


def test_an_exception_in_forward_closes_the_module_region(aggregator):
    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("bad batch")

    model = nn.Sequential(nn.Linear(2, 2), Broken())
    tracer = otel_ml.trace_modules(model, depth=1, every=1)
    with pytest.raises(ValueError, match="bad batch"):
        model(torch.zeros(1, 2))
    assert timing.current_path() is None
    assert set(_counts(aggregator)) == {"Sequential", "Sequential/0", "Sequential/1"}
    tracer.remove()


def test_hooks_do_nothing_before_init():
    timing.install(None)
    net = Net()
    tracer = otel_ml.trace_modules(net, depth=None)
    out = net(torch.randint(0, 10, (2, 3)))
    out.sum().backward()
    assert timing.current_path() is None
    tracer.remove()


def test_a_failure_inside_module_timing_never_reaches_forward_or_backward(aggregator, monkeypatch, caplog):
    net = Net()
    tracer = otel_ml.trace_modules(net, depth=1, every=1)
    errors: list[int] = []
    aggregator.recorder.on_error = lambda: errors.append(1)

    def broken(*_: object) -> None:
        raise RuntimeError("internal")

    monkeypatch.setattr(modules._TracedModule, "hook_backward", broken)
    losses = _train(net, 2, aggregator.recorder)  # forward and backward run as usual
    assert len(losses) == 2 and all(loss == loss for loss in losses)
    assert len(errors) == 10  # counted once per timed module call: 5 modules x 2 steps
    monkeypatch.undo()
    monkeypatch.setattr(modules._Backward, "start", broken)  # now fail inside autograd hooks
    assert len(_train(net, 2, aggregator.recorder)) == 2
    assert caplog.text.count("module timing failed") == 1  # logged once
    assert len(errors) > 10  # and once per failing node hook in backward
    tracer.remove()


@pytest.mark.parametrize(("trace_every", "expected"), [(30, 30), (0, 100)])
def test_modules_follow_the_tracing_interval_by_default(tmp_path, trace_every, expected):
    settings = {"prometheus_port": 0, "files": "off", "summary": False, "run_dir": tmp_path}
    otel_ml.init(service_name="t", trace_every=trace_every, **settings)
    try:
        tracer = otel_ml.trace_modules(Net(), depth=1)
        assert tracer.every == expected
        assert otel_ml.trace_modules(Net(), depth=1, every=7).every == 7
    finally:
        otel_ml.shutdown()
        runtime._current = None  # later tests expect no instance, not a closed one

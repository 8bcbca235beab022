"""GPU check: otel_ml's CUDA paths on a real GPU, one PASS/FAIL line per check and a cost table.

    python benchmarks/gpu_check.py            # about 2 minutes on one GPU
    python benchmarks/gpu_check.py --quick    # fewer repetitions

Checks (each in a fresh process where start-up state matters):

* ``no-cuinit``: ``init()``, spans, ``log()`` of floats and the pump running, with no CUDA call
  by the "user": the driver is still uninitialised (``cuCtxGetCurrent`` through ctypes returns
  ``CUDA_ERROR_NOT_INITIALIZED``) and ``torch.cuda.is_initialized()`` is False.
* ``no-stray-context``: after regions and deferred values on the last GPU, read by the pump,
  only that GPU has an active primary context (``cuDevicePrimaryCtxGetState``); with one GPU
  the check still runs but cannot tell devices apart (said in its line).
* ``gpu-time``: GPU-timed regions around matmuls are within 10% of ``torch.cuda.Event`` pairs
  timed by hand around the same kernels.
* ``deferred-loss``: a CUDA loss passed to ``log()`` reads back equal to ``.item()``.
* ``graph-capture``: ``torch.cuda.graph`` capture (global mode) with a region inside, while
  the pump queries the events of regions recorded just before, completes and replays.
* ``compile``: ``torch.compile(mode="reduce-overhead")`` runs under a region.

Costs (median of repeated batches, µs per call on the training thread): a region with CUDA
timing off and on, ``log()`` of a float and of a CUDA tensor.

Exit status 0 when every check passes, 1 otherwise, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_ERROR_NOT_INITIALIZED = 3


def _libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def driver_initialised() -> bool:
    """False while nothing in this process called cuInit (cuCtxGetCurrent says so)."""
    ctx = ctypes.c_void_p()
    return _libcuda().cuCtxGetCurrent(ctypes.byref(ctx)) != CUDA_ERROR_NOT_INITIALIZED


def active_primary_contexts(count: int) -> list[int]:
    """Devices whose primary context is active in this process."""
    lib = _libcuda()
    active = []
    for index in range(count):
        device, flags, state = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
        if lib.cuDeviceGet(ctypes.byref(device), index) != 0:
            continue
        if (
            lib.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(state)) == 0
            and state.value
        ):
            active.append(index)
    return active


def _child(code: str, timeout: float = 180) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"ok": False, "detail": (done.stderr or done.stdout).strip().splitlines()[-3:]}
    return json.loads(lines[-1])


PRELUDE = f"""
import json, sys, time, tempfile
sys.path.insert(0, {str(ROOT)!r})
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
import otel_ml
from gpu_check import driver_initialised, active_primary_contexts
def start(**kw):
    return otel_ml.init(prometheus_port=0, run_dir=tempfile.mkdtemp(), summary=False, timing_table=False,
                        set_global_providers=False, **kw)
"""


#: A child that initialised CUDA on device 0 and started otel_ml.
ON_GPU_0 = PRELUDE + "import torch\ntorch.cuda.set_device(0)\nt = start()\n"


def check_no_cuinit() -> dict:
    return _child(
        PRELUDE
        + """
import torch
t = start()
for step in range(50):
    with otel_ml.span("forward"):
        sum(range(1000))
    otel_ml.log(step, loss=1.0 / (step + 1))
time.sleep(1.5)  # three pump ticks; a scrape too
import urllib.request; urllib.request.urlopen(t.metrics_url, timeout=5).read()
t.flush(5)
result = {"driver_initialised": driver_initialised(), "torch_initialised": torch.cuda.is_initialized()}
t.shutdown(5)
result["ok"] = not result["driver_initialised"] and not result["torch_initialised"]
print(json.dumps(result))
"""
    )


def check_no_stray_context() -> dict:
    return _child(
        PRELUDE
        + """
import torch
count = torch.cuda.device_count()
last = count - 1
x = torch.randn(512, 512, device=f"cuda:{last}")  # no set_device: the current device stays 0
t = start()
for step in range(30):
    with otel_ml.span("forward"):
        y = x @ x
    otel_ml.log(step, loss=y.mean())
time.sleep(1.5)
import urllib.request; urllib.request.urlopen(t.metrics_url, timeout=5).read()
t.flush(5)
active = active_primary_contexts(count)
t.shutdown(5)
print(json.dumps({"ok": active == [last], "active": active, "devices": count}))
"""
    )


def check_gpu_time(rounds: int) -> dict:
    return _child(
        PRELUDE
        + f"""
import torch
torch.cuda.init(); torch.cuda.set_device(0)
x = torch.randn(4096, 4096, device="cuda")
t = start()
for _ in range(3):
    x @ x
torch.cuda.synchronize()
manual = []
for _ in range({rounds}):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with otel_ml.span("matmul"):
        a.record()
        for _ in range(4):
            y = x @ x
        b.record()
    manual.append((a, b))
torch.cuda.synchronize()
t.flush(5)
stats = {{n.path: s for n, s in t.timekeeper.aggregator.stats.items()}}["matmul"]
hand = sum(a.elapsed_time(b) for a, b in manual) / 1e3
ratio = stats.total / hand
t.shutdown(5)
print(json.dumps({{"ok": stats.gpu_count == {rounds} and abs(ratio - 1) <= 0.10, "ratio": ratio,
                  "gpu_count": stats.gpu_count, "region_s": stats.total, "hand_s": hand}}))
"""
    )


def check_deferred_loss() -> dict:
    return _child(
        ON_GPU_0
        + """
loss = (torch.randn(1000, device="cuda") ** 2).mean()
otel_ml.log(1, loss=loss)
expected = loss.item()
t.flush(5)
got = t.training._latest.get("loss") if t.training is not None else None
t.shutdown(5)
print(json.dumps({"ok": got == expected, "logged": got, "item": expected}))
"""
    )


def check_distribution_no_sync() -> dict:
    """A CUDA reward tensor per step, logged with sync debug mode "error" (any host sync on the
    training thread raises), then compared on /metrics with the statistics of its host copy."""
    return _child(
        ON_GPU_0
        + r"""
import math, re, urllib.request
steps, values = 20, []
rewards = [torch.randn(4096, device="cuda") for _ in range(steps)]
rewards[-1][7] = float("nan")
torch.cuda.synchronize()
error = None
torch.cuda.set_sync_debug_mode("error")
try:
    for step, reward in enumerate(rewards):
        otel_ml.log(step, reward=reward)
except RuntimeError as exc:
    error = str(exc)
finally:
    torch.cuda.set_sync_debug_mode(0)
last = [v for v in rewards[-1].tolist() if math.isfinite(v)]
total = sum(len([v for v in r.tolist() if math.isfinite(v)]) for r in rewards)
t.flush(5)
time.sleep(1.5)
text = urllib.request.urlopen(t.metrics_url).read().decode()
def one(name):
    m = re.search(name + r'\{[^}]*metric="reward"[^}]*\} (\S+)', text)
    return float(m.group(1)) if m else None
got = {"count": one("otel_ml_distribution_count"), "last_size": one("otel_ml_distribution_last_size"),
       "last_mean": one("otel_ml_distribution_last_mean"), "last_max": one("otel_ml_distribution_last_max"),
       "nonfinite": one("otel_ml_nonfinite_total")}
want = {"count": total, "last_size": len(last), "last_mean": sum(last) / len(last), "last_max": max(last),
        "nonfinite": 1}
ok = error is None and all(got[k] is not None and abs(got[k] - want[k]) <= 1e-4 * max(1, abs(want[k]))
                           for k in want)
t.shutdown(5)
print(json.dumps({"ok": ok, "sync_error": error, "got": got, "want": want}))
"""
    )


def check_graph_capture() -> dict:
    return _child(
        ON_GPU_0
        + """
static_in = torch.randn(1024, 1024, device="cuda")
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    for _ in range(3):
        static_out = static_in @ static_in  # warm-up, as torch.cuda.graph requires
torch.cuda.current_stream().wait_stream(side)
for _ in range(200):  # events the pump will be querying during the capture
    with otel_ml.span("before"):
        static_in @ static_in
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):  # capture_error_mode="global", the default
    with otel_ml.span("captured"):
        static_out = static_in @ static_in
    time.sleep(1.2)  # two pump ticks inside the capture
g.replay()
torch.cuda.synchronize()
ok = torch.allclose(static_out, static_in @ static_in)
t.flush(5)
stats = {n.path: s for n, s in t.timekeeper.aggregator.stats.items()}
errors = dict(t.health.errors)
t.shutdown(5)
print(json.dumps({"ok": bool(ok) and stats["captured"].gpu_count == 0, "replay_matches": bool(ok),
                  "timing_errors": errors.get("timing", 0)}))
"""
    )


def check_compile() -> dict:
    return _child(
        ON_GPU_0
        + """
model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256)).cuda()
compiled = torch.compile(model, mode="reduce-overhead")
x = torch.randn(64, 256, device="cuda")
for step in range(6):
    with otel_ml.span("compiled"):
        out = compiled(x)
    otel_ml.log(step, loss=out.float().mean())
torch.cuda.synchronize()
ok = torch.allclose(out, model(x), atol=1e-3)
t.flush(5)
count = {n.path: s for n, s in t.timekeeper.aggregator.stats.items()}["compiled"].count
t.shutdown(5)
print(json.dumps({"ok": bool(ok) and count == 6, "regions": count}))
""",
        timeout=300,
    )


def measure_costs(batches: int) -> dict:
    return _child(
        PRELUDE
        + f"""
import statistics, torch
torch.cuda.set_device(0)
loss_gpu = torch.ones((), device="cuda")
def per_call(fn, n=2000):
    samples = []
    for _ in range({batches}):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter_ns() - t0) / n / 1e3)
    return statistics.median(samples)
def region():
    with otel_ml.span("r"):
        pass
out = {{}}
for mode in ("off", "on"):
    t = start(cuda_timing=mode)
    time.sleep(0.6)  # the pump turns CUDA timing on once CUDA is initialised
    out[f"region, CUDA timing {{mode}}"] = per_call(region)
    step = iter(range(10**9))
    out[f"log(loss=float), CUDA timing {{mode}}"] = per_call(lambda: otel_ml.log(next(step), loss=0.5))
    out[f"log(loss=cuda tensor), CUDA timing {{mode}}"] = per_call(
        lambda: otel_ml.log(next(step), loss=loss_gpu), 500)
    t.shutdown(5)
print(json.dumps({{"ok": True, "costs": out}}))
""",
        timeout=300,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("gpu_check: torch is not installed")
        return 2
    if not torch.cuda.is_available():  # this process may initialise CUDA: the checks run in children
        print("gpu_check: no CUDA device here; nothing checked (this is the CPU machine)")
        return 2
    name = torch.cuda.get_device_name(0)
    print(
        f"otel_ml gpu_check, {datetime.date.today()}, {torch.cuda.device_count()} x {name}, "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    )
    started = time.monotonic()
    checks = [
        ("no-cuinit", check_no_cuinit),
        ("no-stray-context", check_no_stray_context),
        ("gpu-time", lambda: check_gpu_time(10 if args.quick else 30)),
        ("deferred-loss", check_deferred_loss),
        ("distribution-no-sync", check_distribution_no_sync),
        ("graph-capture", check_graph_capture),
        ("compile", check_compile),
    ]
    failed = 0
    for label, check in checks:
        try:
            result = check()
        except subprocess.TimeoutExpired:
            result = {"ok": False, "detail": "timed out"}
        failed += not result.get("ok")
        detail = {k: v for k, v in result.items() if k != "ok"}
        if label == "no-stray-context" and result.get("devices") == 1:
            detail["note"] = "one GPU: cannot show a context on another device"
        print(f"{'PASS' if result.get('ok') else 'FAIL'} {label}: {json.dumps(detail)}")
    costs = measure_costs(5 if args.quick else 15)
    print("\n| training-thread cost | µs per call (median) |\n|---|---|")
    for key, micros in (costs.get("costs") or {}).items():
        print(f"| {key} | {micros:.2f} |")
    if not costs.get("ok"):
        print(f"FAIL costs: {costs.get('detail')}")
        failed += 1
    print(
        f"\n{len(checks) - failed + (1 if costs.get('ok') else 0)} passed, {failed} failed "
        f"in {time.monotonic() - started:.0f} s"
    )
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

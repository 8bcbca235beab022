"""``otel-ml demo``: a real multi-rank torch.distributed (gloo, CPU) training run, fully instrumented.

The launcher starts ``--ranks`` worker processes with the variables torchrun would set (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) plus a shared ``OTEL_ML_RUN_ID``.
Each worker trains a small transformer language model on generated sequences with DDP, times
data/forward/backward/optimizer with ``otel_ml.span`` and every module with ``trace_modules``, and
calls ``otel_ml.log()`` every step; then each rank scores its share of ``--files`` generated
files with ``otel_ml.scores`` (a score per row, batch lines and a summary per file on the rank's
terminal, ``scores.jsonl`` in its run dir) under nested bars (files, rows per file). Rank 0 shows
its bar, every rank's line, the live timing table, and its timing summary at the end; the launcher
then prints where everything went. The worker also runs under torchrun directly::

    torchrun --nproc-per-node 2 -m otel_ml.cli.demo --worker

Fault injection for tests and alert demos: ``--nan RANK:STEP`` makes that rank log a NaN loss
from STEP on (``RANK:STEP-END``: up to step END, excluded, then finite again); ``--slow RANK:MS``
makes that rank's forward pass MS milliseconds slower.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import otel_ml
from otel_ml.rundir import ENDPOINT_FILE, rank_dir

VOCAB, SEQ, BATCH, DIM = 64, 32, 16, 64
REWARD_BUCKETS = tuple(i / 10 for i in range(11))
#: Rows scored per batch in the inference part, and the bounds of their scores (0 to 10).
SCORE_ROWS, SCORE_BUCKETS = 64, tuple(float(i) for i in range(11))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse_pair(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    rank, _, value = text.partition(":")
    return int(rank), int(value)


def _parse_nan(text: str | None) -> tuple[int, int, int | None] | None:
    """``RANK:STEP`` or ``RANK:STEP-END`` -> (rank, first NaN step, first finite step again or None)."""
    if not text:
        return None
    rank, _, steps = text.partition(":")
    first, _, end = steps.partition("-")
    return int(rank), int(first), int(end) if end else None


def _batch(generator: Any, torch: Any) -> tuple[Any, Any]:
    """Sequences that follow ``x[t+1] = (x[t] * a + b) % VOCAB``: learnable, so the loss falls."""
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=generator)
    a = torch.randint(1, 4, (BATCH, 1), generator=generator)
    steps = torch.arange(SEQ + 1).unsqueeze(0)
    seq = (start + a * steps) % VOCAB
    return seq[:, :-1], seq[:, 1:]


def worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # "reward" is a distribution (one value per sequence, in [0, 1]): buckets of 0.1 for its heatmap.
    telemetry = otel_ml.init(
        service_name="otel-ml-demo", distribution_buckets={"reward": REWARD_BUCKETS, "score": SCORE_BUCKETS}
    )
    torch.manual_seed(0)

    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, DIM)
            self.pos = nn.Parameter(torch.zeros(SEQ, DIM))
            layer = nn.TransformerEncoderLayer(DIM, 4, 2 * DIM, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(DIM, VOCAB)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ))

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(self.embed(tokens) + self.pos, mask=self.mask, is_causal=True)
            return self.head(hidden)

    # The causal mask is a constant buffer: syncing buffers every forward (DDP's default) would
    # make fast ranks wait inside forward and hide a straggler's slow forward. torch 2.13 renamed
    # the switch to forward_sync_buffers (broadcast_buffers warns there); older torch has only the
    # old name (the new one still syncs buffers once at construction: the mask is the same anyway).
    ddp = nn.parallel.DistributedDataParallel
    renamed = "forward_sync_buffers" in inspect.signature(ddp).parameters
    model = ddp(TinyLM(), **{"forward_sync_buffers" if renamed else "broadcast_buffers": False})
    otel_ml.trace_modules(model.module, depth=2)  # forward and backward time per module
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    warmup = max(1, args.steps // 10)

    def lr_factor(s: int) -> float:  # linear warmup, cosine decay
        return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(1234 + rank)
    nan_at, slow = _parse_nan(args.nan), _parse_pair(args.slow)
    # Every rank exports its bar; only rank 0 prints it (with the other ranks' lines above it).
    bar = otel_ml.tqdm(range(args.steps), desc="train", unit="step")
    for step in bar:
        with otel_ml.span("data"):
            inputs, targets = _batch(generator, torch)
        with otel_ml.span("forward"):
            if slow and slow[0] == rank:
                time.sleep(slow[1] / 1000)
            logits = model(inputs)
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        with otel_ml.span("backward"):  # includes DDP's gradient all-reduce
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with otel_ml.span("optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        with torch.no_grad():
            log_probs = torch.log_softmax(logits, dim=-1)
            kl = (log_probs.exp() * (log_probs + math.log(VOCAB))).sum(-1).mean()  # KL(p || uniform)
            # A stand-in for an RL reward per rollout: the share of each sequence's next tokens
            # predicted right. Logged as a distribution (histogram + last min/mean/max/stddev).
            reward = (logits.argmax(-1) == targets).float().mean(-1)
        logged_loss = loss.detach()
        if nan_at and nan_at[0] == rank and nan_at[1] <= step < (nan_at[2] or args.steps):
            logged_loss = torch.tensor(float("nan"))
        otel_ml.log(
            step,
            loss=logged_loss,
            lr=schedule.get_last_lr()[0],
            grad_norm=grad_norm,
            samples=BATCH,
            tokens=BATCH * SEQ,
            kl=kl,
            reward=reward,
        )
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    if args.files:
        _inference(model.module, rank, world, args.files, torch)
    if args.linger > 0:
        time.sleep(args.linger)
    dist.barrier()
    otel_ml.shutdown()
    dist.destroy_process_group()
    del telemetry
    return 0


def _inference(model: Any, rank: int, world: int, files: int, torch: Any) -> None:
    """Score this rank's share of ``files`` generated files with ``otel_ml.scores``: a score per row
    (10 x the share of its next tokens predicted right), ``SCORE_ROWS`` rows a batch, one scorer per
    file (its bar nested under the files bar, its batch lines and summary on the rank's terminal,
    every row in the rank's scores.jsonl, the scores in ``otel_ml_distribution{metric="score"}``)."""
    model.eval()
    mine = [f"part-{i:03d}.tokens" for i in range(files) if i % world == rank]
    with torch.no_grad():
        for index, name in enumerate(otel_ml.tqdm(mine, desc="inference", unit="file")):
            rows = 256 + 128 * (index % 3)
            generator = torch.Generator().manual_seed(hash((rank, name)) % 2**31)
            with otel_ml.scores("score", total=rows, desc=name, unit="row", leave=False) as scorer:
                for first in range(0, rows, SCORE_ROWS):
                    with otel_ml.span("inference/batch"):
                        parts = [_batch(generator, torch) for _ in range(SCORE_ROWS // BATCH)]
                        targets = torch.cat([t for _, t in parts])
                        predicted = model(torch.cat([x for x, _ in parts])).argmax(-1)
                    scores = (predicted == targets).double().mean(-1) * 10
                    texts = [" ".join(map(str, row[:16])) for row in predicted.tolist()]
                    ids = [f"{name}:{first + i}" for i in range(len(texts))]
                    scorer.add(scores, ids=ids, texts=texts)
    model.train()


def _summary(run_dir: Path, world: int) -> str:
    lines = ["", f"otel_ml demo finished: {world} rank(s), run dir {run_dir.resolve()}"]
    for rank in range(world):
        directory = rank_dir(run_dir, rank)
        try:
            info = json.loads((directory / ENDPOINT_FILE).read_text())
            url = info.get("url") or "(no /metrics)"
        except (OSError, ValueError):
            url = "(no endpoint file)"
        files = ", ".join(sorted(p.name for p in directory.glob("*.jsonl"))) or "none"
        lines.append(f"  rank {rank}: /metrics was {url}; files: {files}")
    lines += [
        "Point Prometheus at live ranks with file_sd targets written from the port files:",
        f"  otel-ml targets {run_dir} > targets.json   # file_sd_configs: [{{files: [targets.json]}}]",
        f"Inspect what was recorded offline:  otel-ml inspect {run_dir}",
        "While a run is going, `curl localhost:9464/metrics` (rank 0) and :9465 (rank 1) show each rank.",
    ]
    return "\n".join(lines)


def launch(args: argparse.Namespace) -> int:
    """Start ``args.ranks`` workers on this machine, wait, print the summary."""
    run_id = os.environ.get("OTEL_ML_RUN_ID") or time.strftime("demo-%Y%m%d-%H%M%S")
    run_dir = Path(os.environ.get("OTEL_ML_RUN_DIR", "otel-ml-runs/{run_id}").replace("{run_id}", run_id))
    env_common = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(args.ranks),
        "OTEL_ML_RUN_ID": run_id,
        "OTEL_ML_RUN_DIR": str(run_dir),
        "OTEL_METRIC_EXPORT_INTERVAL": os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", "5000"),
        "OTEL_ML_TRACE_EVERY": os.environ.get("OTEL_ML_TRACE_EVERY", "25"),
        "OTEL_ML_TIMING_TABLE": os.environ.get("OTEL_ML_TIMING_TABLE", "1"),
        "OTEL_ML_TIMING_TABLE_EVERY": os.environ.get("OTEL_ML_TIMING_TABLE_EVERY", "250"),
    }
    command = [sys.executable, "-m", "otel_ml.cli.demo", "--worker", "--steps", str(args.steps)]
    command += ["--files", str(args.files)]
    for flag in ("nan", "slow"):
        if getattr(args, flag):
            command += [f"--{flag}", getattr(args, flag)]
    if args.linger:
        command += ["--linger", str(args.linger)]
    print(f"otel_ml demo: run {run_id}, {args.ranks} rank(s), {args.steps} steps", flush=True)
    procs = []
    for rank in range(args.ranks):
        env = {**env_common, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        stdout = None if rank == 0 else subprocess.DEVNULL
        procs.append(subprocess.Popen(command, env=env, stdout=stdout))

    def forward(signum: int, _frame: Any) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        forward(signal.SIGINT, None)
        codes = [p.wait() for p in procs]
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(_summary(run_dir, args.ranks), flush=True)
    return max(codes, key=abs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ranks", type=int, default=2, help="processes to start (default 2)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    parser.add_argument("--files", type=int, default=8, help="files to score after training (0: none)")
    parser.add_argument("--linger", type=float, default=0.0, help="seconds to keep serving after training")
    parser.add_argument(
        "--nan", metavar="RANK:STEP[-END]", help="log NaN loss on RANK from STEP on (up to END, excluded)"
    )
    parser.add_argument("--slow", metavar="RANK:MS", help="slow RANK's forward pass by MS milliseconds")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="otel-ml demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    sys.exit(main())

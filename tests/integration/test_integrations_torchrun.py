"""Each integration in a real 2-process torchrun job (gloo, CPU), both ranks scraped while it runs.

Every job pauses at step ``PAUSE`` (``tests/support/torchrun.py``); rank 1 makes its loss NaN at
step ``NAN``. Under DDP the NaN gradients then reach rank 0's weights, so rank 0's loss is NaN
from the next step on: rank 1 must be the first, hence the one with more NaN losses counted.
"""

from __future__ import annotations

import json
import math
import re

import pytest

from tests.support.torchrun import TorchrunJob, value, wait_for


def _stopped(output: str) -> list[dict]:
    """The ranks' ``STOPPED {...}`` records, wherever torchrun's merged output put them."""
    record = r'STOPPED (\{"rank": \d+, "step": \d+, "reason": (?:null|\[[^\]]*\])\})'
    return [json.loads(m) for m in re.findall(record, output)]


pytestmark = pytest.mark.integration

TOTAL, PAUSE, NAN = 8, 6, 4


def _check_ranks(scraped: dict[int, dict], *, progress: bool = True, region: str | None = "step") -> None:
    """Per-rank loss, step, progress total, a step histogram and rank 1's NaN counted first."""
    assert sorted(scraped) == [0, 1]
    for rank, samples in scraped.items():
        labels = {"rank": str(rank)}
        loss = value(samples, "otel_ml_loss", **labels)
        assert loss is not None and math.isfinite(loss), (rank, loss)
        assert value(samples, "otel_ml_step", **labels) == PAUSE
        if progress:
            assert value(samples, "otel_ml_progress_total", task="train", **labels) == TOTAL
            assert value(samples, "otel_ml_progress_completed", task="train", **labels) == PAUSE
        if region is not None:
            count = value(samples, "otel_ml_span_duration_seconds_count", path=region, **labels)
            assert count is not None and count >= PAUSE - 1, (rank, count)
        else:
            count = value(samples, "otel_ml_step_duration_seconds_count", **labels)
            assert count is not None and count >= PAUSE - 2, (rank, count)
    nan = {rank: value(s, "otel_ml_nonfinite_total", metric="loss") for rank, s in scraped.items()}
    assert nan[1] == PAUSE - NAN + 1, nan
    assert nan[0] < nan[1], nan


def _run(processes, tmp_path, script: str, **kwargs) -> tuple[dict[int, dict], str]:
    job = TorchrunJob.start(processes, tmp_path, script, total=TOTAL, pause_at=PAUSE, nan_at=NAN, **kwargs)
    scraped = job.wait_paused(PAUSE)
    job.release()
    return scraped, job.finish()


#: A tiny GPT-2 Trainer job's pieces: in-memory data, and rank 1's weights made NaN at NAN_AT.
HF_PARTS = """
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from otel_ml.integrations.transformers import OtelMLCallback

class Data(torch.utils.data.Dataset):
    ids = torch.randint(0, 64, (64, 12), generator=torch.Generator().manual_seed(0))
    def __len__(self):
        return len(self.ids)
    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

class Inject(TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if RANK == 1 and state.global_step == NAN_AT - 1:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))

config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
args = TrainingArguments(output_dir="out", max_steps=TOTAL, per_device_train_batch_size=4,
                         logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                         disable_tqdm=True, ddp_backend="gloo")
"""

HF_JOB = (
    HF_PARTS
    + """
class Pause(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        pause(state.global_step)

Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=Data(),
        callbacks=[OtelMLCallback(), Inject(), Pause()]).train()
"""
)


def test_transformers_trainer_on_two_ranks(processes, tmp_path):
    pytest.importorskip("transformers")
    scraped, _ = _run(processes, tmp_path, HF_JOB)
    _check_ranks(scraped)
    for rank, samples in scraped.items():
        assert value(samples, "otel_ml_span_duration_seconds_count", path="step/optimizer", rank=str(rank))
        assert value(samples, "otel_ml_samples_total", rank=str(rank)) == PAUSE * 4


#: A 2-rank DDP Lightning job's pieces: a linear model whose rank 1 loss is NaN at NAN_AT, data.
LIGHTNING_PARTS = """
import torch
import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy
from otel_ml.integrations.lightning import OtelMLCallback

class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        if RANK == 1 and self.global_step == NAN_AT - 1:
            loss = loss * float("nan")
        self.log("train_mse", loss)
        return loss
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
"""

LIGHTNING_JOB = (
    LIGHTNING_PARTS
    + """
class Pause(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pause(trainer.global_step)

trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
                     max_steps=TOTAL, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, log_every_n_steps=1, callbacks=[OtelMLCallback(), Pause()])
trainer.fit(Model(), data)
"""
)


def test_lightning_trainer_on_two_ranks(processes, tmp_path):
    pytest.importorskip("lightning")
    scraped, _ = _run(processes, tmp_path, LIGHTNING_JOB)
    _check_ranks(scraped)
    for rank, samples in scraped.items():
        assert value(samples, "otel_ml_train_mse", rank=str(rank)) is not None


ACCELERATE_JOB = """
import torch
from accelerate import Accelerator
from otel_ml.integrations.accelerate import OtelMLTracker

accelerator = Accelerator(log_with=[OtelMLTracker()], cpu=True)
accelerator.init_trackers("torchrun-test", config={"max_train_steps": TOTAL})
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
model, optimizer = accelerator.prepare(model, optimizer)
generator = torch.Generator().manual_seed(RANK)
for step in range(1, TOTAL + 1):
    x = torch.randn(8, 4, generator=generator)
    loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
    if RANK == 1 and step == NAN_AT:
        loss = loss * float("nan")
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    accelerator.log({"train_loss": loss.item(), "lr": 0.01}, step=step)
    pause(step)
accelerator.end_training()
"""


def test_accelerate_tracker_on_two_ranks(processes, tmp_path):
    pytest.importorskip("accelerate")
    scraped, _ = _run(processes, tmp_path, ACCELERATE_JOB)
    _check_ranks(scraped, region=None)


VERL_JOB = """
import torch
import torch.distributed as dist
from otel_ml.integrations.verl import OtelMLTracking

dist.init_process_group("gloo")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
tracker = OtelMLTracking(total_steps=TOTAL)
generator = torch.Generator().manual_seed(RANK)
for step in range(1, TOTAL + 1):
    started = time.perf_counter()
    x = torch.randn(8, 4, generator=generator)
    time.sleep(0.01)  # "generation"
    generated = time.perf_counter() - started
    loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
    if RANK == 1 and step == NAN_AT:
        loss = loss * float("nan")
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    metrics = {"actor/pg_loss": loss.item(), "actor/ppo_kl": 0.01, "actor/grad_norm": grad_norm.item(),
               "critic/score/mean": 0.5, "perf/total_num_tokens": 96, "perf/throughput": 1000.0,
               "timing_s/gen": generated, "timing_s/step": time.perf_counter() - started}
    tracker.log(data=metrics, step=step)
    pause(step)
tracker.finish()
dist.destroy_process_group()
"""


def test_verl_tracking_on_two_ranks(processes, tmp_path):
    scraped, _ = _run(processes, tmp_path, VERL_JOB)
    _check_ranks(scraped)
    for rank, samples in scraped.items():
        labels = {"rank": str(rank)}
        assert value(samples, "otel_ml_span_duration_seconds_count", path="step/gen", **labels) >= PAUSE - 1
        assert value(samples, "otel_ml_kl", **labels) == pytest.approx(0.01)
        assert value(samples, "otel_ml_reward", **labels) == pytest.approx(0.5)


TENSORBOARD_JOB = """
import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

dist.init_process_group("gloo")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
writer = SummaryWriter(f"tb/rank-{RANK}")
generator = torch.Generator().manual_seed(RANK)
for step in range(1, TOTAL + 1):
    x = torch.randn(8, 4, generator=generator)
    loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
    if RANK == 1 and step == NAN_AT:
        loss = loss * float("nan")
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    writer.add_scalar("train/loss", loss.item(), step)
    writer.add_scalars("metrics", {"a": 1.0, "b": float(step)}, step)
    writer.flush()
    pause(step)
writer.close()
dist.destroy_process_group()
"""


def test_an_unmodified_tensorboard_script_exports_after_patch(processes, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runner = ("-m", "otel_ml.integrations.tensorboard")
    scraped, _ = _run(processes, tmp_path, TENSORBOARD_JOB, runner=runner)
    _check_ranks(scraped, progress=False, region=None)
    for rank, samples in scraped.items():
        labels = {"rank": str(rank)}
        assert value(samples, "otel_ml_scalar", tag="metrics/b", **labels) == PAUSE
        assert value(samples, "otel_ml_scalar", tag="train/loss", **labels) is not None
        events = EventAccumulator(str(tmp_path / "tb" / f"rank-{rank}"))
        events.Reload()
        assert "train/loss" in events.Tags()["scalars"]
        assert len(events.Scalars("train/loss")) == TOTAL


ELASTIC_JOB = """
import sys
import otel_ml

otel_ml.init()
if int(os.environ["TORCHELASTIC_RESTART_COUNT"]) == 0 and RANK == 1:
    sys.exit(3)  # the first attempt fails: the agent restarts the worker group
for step in range(1, TOTAL + 1):
    otel_ml.log(step, loss=1.0 / step)
    pause(step)
"""


def test_torchelastic_agent_exports_restarts_and_rendezvous(processes, tmp_path):
    launcher = ("-m", "otel_ml.integrations.torchelastic")
    job = TorchrunJob.start(
        processes,
        tmp_path,
        ELASTIC_JOB,
        launcher=launcher,
        launcher_args=("--max-restarts", "1", "--monitor-interval", "0.2"),
        total=TOTAL,
        pause_at=PAUSE,
        nan_at=NAN,
    )
    endpoint = job.run_dir / "elastic-agent-0" / "rank-0" / "endpoint.json"

    def agent_series() -> dict | None:
        if not endpoint.exists():
            return None
        samples = job.scrape(json.loads(endpoint.read_text())["url"])
        restarted = value(
            samples, "otel_ml_elastic_operations_total", operation="restart_workers", outcome="success"
        )
        healthy = value(samples, "otel_ml_elastic_worker_state", role="default", state="healthy")
        return samples if restarted == 1 and healthy == 1 else None

    samples = wait_for(agent_series, 90, "the agent's restart and a healthy group", job)
    assert value(samples, "otel_ml_elastic_remaining_restarts", role="default") == 0
    assert value(samples, "otel_ml_elastic_operations_total", operation="rendezvous", outcome="success") == 2
    assert value(samples, "otel_ml_elastic_operation_duration_seconds", operation="rendezvous") >= 0
    assert value(samples, "otel_ml_elastic_worker_state", role="default", state="unhealthy") in (0, None)
    job.release()
    job.finish()


HF_STOP_JOB = (
    HF_PARTS
    + """
import json
import sys
import otel_ml

trainer = Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=Data(),
                  callbacks=[OtelMLCallback(stop_on=["nonfinite"], stop_every=2), Inject()])
trainer.train()
reason = otel_ml.stop_reason()
# one write() of one short line: the two ranks share torchrun's stdout, and print() of several
# arguments writes them apart, so the ranks' words could interleave on one line
sys.stdout.write("STOPPED " + json.dumps({"rank": RANK, "step": trainer.state.global_step,
                 "reason": None if reason is None else [reason.rank, reason.type, reason.step]}) + "\\n")
sys.stdout.flush()
"""
)


def test_transformers_ranks_stop_together_on_a_nan_of_one_rank(processes, tmp_path):
    pytest.importorskip("transformers")
    job = TorchrunJob.start(processes, tmp_path, HF_STOP_JOB, total=20, pause_at=0, nan_at=3)
    output = job.finish()
    stopped = _stopped(output)
    assert sorted(s["rank"] for s in stopped) == [0, 1], output[-4000:]
    # The NaN reaches rank 1's loss at step 3; the agreement (every 2 steps) stops both at step 4.
    assert [s["step"] for s in stopped] == [4, 4]
    assert all(s["reason"] == [1, "nonfinite", 3] for s in stopped), stopped


LIGHTNING_STOP_JOB = (
    LIGHTNING_PARTS
    + """
import json
import sys
import otel_ml

trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
                     max_steps=TOTAL, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, log_every_n_steps=1,
                     callbacks=[OtelMLCallback(stop_on=["nonfinite"], stop_every=2)])
trainer.fit(Model(), data)
reason = otel_ml.stop_reason()
# one write() of one short line: the two ranks share torchrun's stdout, and print() of several
# arguments writes them apart, so the ranks' words could interleave on one line
sys.stdout.write("STOPPED " + json.dumps({"rank": RANK, "step": trainer.global_step,
                 "reason": None if reason is None else [reason.rank, reason.type, reason.step]}) + "\\n")
sys.stdout.flush()
"""
)


def test_lightning_ranks_stop_together_on_a_nan_of_one_rank(processes, tmp_path):
    pytest.importorskip("lightning")
    job = TorchrunJob.start(processes, tmp_path, LIGHTNING_STOP_JOB, total=20, pause_at=0, nan_at=3)
    output = job.finish()
    stopped = _stopped(output)
    assert sorted(s["rank"] for s in stopped) == [0, 1], output[-4000:]
    assert len({s["step"] for s in stopped}) == 1 and stopped[0]["step"] < 20, stopped  # together, early
    assert all(s["reason"] == [1, "nonfinite", 3] for s in stopped), stopped

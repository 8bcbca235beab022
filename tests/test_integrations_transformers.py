"""OtelMLCallback in a real Hugging Face Trainer (tiny GPT-2 from a config, data in memory)."""

from __future__ import annotations

import math
import time

import pytest

# First: it sets HF_HUB_OFFLINE before transformers is imported (nothing is downloaded anyway).
from tests.support.integrations import TokenDataset, by_path, options, scrape, start, tiny_gpt2, value_of

pytest.importorskip("transformers")

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import otel_ml
from otel_ml.integrations.transformers import OtelMLCallback


def _args(tmp_path, **extra) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )


class _Poison(TrainerCallback):
    """Makes every weight NaN at the start of step ``at`` (so the loss is NaN from then on)."""

    def __init__(self, at: int, pause: float = 0.0) -> None:
        self.at = at
        self.pause = pause

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
        if state.global_step >= self.at:
            time.sleep(self.pause)


class _Snapshot(TrainerCallback):
    """Scrapes /metrics while training runs, at the end of step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.samples: dict = {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            self.samples = scrape()


def test_trainer_exports_regions_raw_loss_progress_and_throughput(tmp_path):
    start(tmp_path)
    snapshot = _Snapshot(at=5)
    args = _args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=3, gradient_accumulation_steps=2)
    args.save_strategy, args.save_steps = "steps", 3
    trainer = Trainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=TokenDataset(),
        eval_dataset=TokenDataset(count=8, seed=1),
        callbacks=[OtelMLCallback(), snapshot],
    )
    trainer.train()
    during = snapshot.samples
    assert value_of(during, "otel_ml_progress_total", task="train") == 6
    assert value_of(during, "otel_ml_progress_completed", task="train") == 5
    samples = scrape()
    assert value_of(samples, "otel_ml_step") == 6
    loss = value_of(samples, "otel_ml_loss")
    assert loss is not None and 0 < loss < 10
    assert value_of(samples, "otel_ml_learning_rate") is not None
    assert value_of(samples, "otel_ml_grad_norm") is not None
    assert value_of(samples, "otel_ml_eval_loss") is not None
    assert value_of(samples, "otel_ml_samples_total") == 6 * 2 * 4  # steps x accumulation x batch
    assert value_of(samples, "otel_ml_tokens_total") == 6 * 2 * 4 * 12
    counts = by_path(samples)
    assert counts["step"] == 6
    assert counts["step/forward_backward"] == 6
    assert counts["step/optimizer"] == 6
    assert counts["data"] == 6
    assert counts["evaluate"] == 2
    assert counts["save"] == 2
    assert value_of(samples, "otel_ml_nonfinite_total", metric="loss") == 0


def test_a_nan_loss_is_counted_although_the_trainer_filters_it(tmp_path):
    start(tmp_path)
    args = _args(tmp_path, max_steps=6, logging_nan_inf_filter=True)
    trainer = Trainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=TokenDataset(),
        callbacks=[OtelMLCallback(), _Poison(at=3)],
    )
    trainer.train()
    history = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(v) for v in history)  # the Trainer's own logs hide it
    samples = scrape()
    assert value_of(samples, "otel_ml_nonfinite_total", metric="loss") == 3  # steps 4, 5, 6
    assert math.isfinite(value_of(samples, "otel_ml_loss"))


def test_stop_on_stops_the_trainer_instead_of_raising(tmp_path):
    callback = OtelMLCallback(**options(tmp_path, stop_on=["nonfinite"]))
    args = _args(tmp_path, max_steps=400)
    trainer = Trainer(
        model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[callback, _Poison(2, 0.02)]
    )
    trainer.train()  # the callback starts otel_ml itself: no init() in this test
    assert otel_ml.get_telemetry() is not None
    assert 2 < trainer.state.global_step < 400

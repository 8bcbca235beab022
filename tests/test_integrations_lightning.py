"""OtelMLCallback and OtelMLLogger in a real Lightning Trainer (a tiny regression, data in memory)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from otel_ml.integrations.lightning import OtelMLCallback, OtelMLLogger
from tests.support.integrations import by_path, options, scrape, start, value_of


class TinyRegression(pl.LightningModule):
    """y = 2x + 1 with one linear layer; ``poison_at`` makes the loss NaN from that batch on."""

    def __init__(self, poison_at: int | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.poison_at = poison_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        if self.poison_at is not None and self.global_step >= self.poison_at:
            loss = loss * float("nan")
        self.log("train_mse", loss, on_step=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(count: int = 64) -> DataLoader:
    x = torch.randn(count, 4, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, 2 * x.sum(1, keepdim=True) + 1), batch_size=8)


def _trainer(callbacks=(), logger=False, max_steps: int = 6, **extra) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=logger,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **extra,
    )


class _Snapshot(pl.Callback):
    def __init__(self, at: int) -> None:
        self.at = at
        self.samples: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            self.samples = scrape()


def test_callback_exports_regions_loss_metrics_and_progress(tmp_path):
    start(tmp_path)
    snapshot = _Snapshot(at=4)
    trainer = _trainer([OtelMLCallback(), snapshot], val_check_interval=3, limit_val_batches=2)
    trainer.fit(TinyRegression(), _loader(), _loader(16))
    during = snapshot.samples
    assert value_of(during, "otel_ml_progress_total", task="train") == 6
    assert value_of(during, "otel_ml_progress_completed", task="train") == 4
    samples = scrape()
    assert value_of(samples, "otel_ml_step") == 6
    assert 0 < value_of(samples, "otel_ml_loss") < 100
    assert value_of(samples, "otel_ml_train_mse") is not None
    assert value_of(samples, "otel_ml_val_loss") is not None
    assert value_of(samples, "otel_ml_samples_total") == 6 * 8
    counts = by_path(samples)
    assert counts["step"] == 6
    assert counts["step/optimizer"] == 6
    assert counts["data"] == 6
    assert counts["validation"] == 2


def test_a_nan_loss_is_counted_and_stop_on_stops_the_trainer(tmp_path):
    callback = OtelMLCallback(**options(tmp_path, stop_on=["nonfinite"]))
    trainer = _trainer([callback], max_steps=2000)
    trainer.fit(TinyRegression(poison_at=3), _loader(count=20000))
    assert 3 < trainer.global_step < 2000
    samples = scrape()
    assert value_of(samples, "otel_ml_nonfinite_total", metric="loss") >= 1
    assert math.isfinite(value_of(samples, "otel_ml_loss"))


def test_logger_exports_what_self_log_logs(tmp_path):
    start(tmp_path)
    trainer = _trainer(logger=OtelMLLogger(), max_steps=4)
    trainer.fit(TinyRegression(), _loader())
    samples = scrape()
    assert value_of(samples, "otel_ml_train_mse") is not None
    assert value_of(samples, "otel_ml_step") == 3  # Lightning logs steps 0-based

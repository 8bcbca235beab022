"""TensorBoard: the exporting SummaryWriter and patch() with the real torch and tensorboardX writers."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorboard")

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from otel_ml.integrations import tensorboard
from tests.support.integrations import scrape, start, value_of


@pytest.fixture(autouse=True)
def _unpatched():
    tensorboard.unpatch()
    yield
    tensorboard.unpatch()


def _tags(directory) -> set[str]:
    events = EventAccumulator(str(directory))
    events.Reload()
    return set(events.Tags()["scalars"])


def test_writer_exports_scalars_and_still_writes_its_event_file(tmp_path):
    start(tmp_path)
    writer = tensorboard.SummaryWriter(str(tmp_path / "tb"))
    for step in range(3):
        writer.add_scalar("train/loss", torch.tensor(1.0 / (step + 1)), step)
        writer.add_scalar("eval/accuracy", 0.5 + step / 10, step)
    writer.add_scalars("lr", {"group0": 1e-3, "group1": 2e-3}, 2)
    writer.add_scalar("eval/accuracy", float("nan"), 3)
    writer.close()
    samples = scrape()
    assert value_of(samples, "otel_ml_scalar", tag="train/loss") == pytest.approx(1 / 3)
    assert value_of(samples, "otel_ml_scalar", tag="eval/accuracy") == pytest.approx(0.7)
    assert value_of(samples, "otel_ml_scalar", tag="lr/group1") == pytest.approx(2e-3)
    assert value_of(samples, "otel_ml_scalar_nonfinite_total", tag="eval/accuracy") == 1
    assert value_of(samples, "otel_ml_loss") == pytest.approx(1 / 3)  # train/loss spells the built-in
    assert value_of(samples, "otel_ml_step") == 2
    assert {"train/loss", "eval/accuracy"} <= _tags(tmp_path / "tb")


def test_patch_makes_existing_writer_classes_export_once(tmp_path):
    start(tmp_path)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "before"))  # made before patch(): exports too
    patched = tensorboard.patch()
    assert SummaryWriter in patched
    assert tensorboard.patch() == []  # idempotent
    writer.add_scalar("loss", float("nan"), 1)
    writer.add_scalar("loss", 2.0, 2)
    own = tensorboard.SummaryWriter(str(tmp_path / "own"))
    own.add_scalar("other", 1.0, 1)
    writer.close()
    own.close()
    samples = scrape()
    assert value_of(samples, "otel_ml_scalar", tag="loss") == 2.0
    assert value_of(samples, "otel_ml_scalar_nonfinite_total", tag="loss") == 1
    assert value_of(samples, "otel_ml_scalar_nonfinite_total", tag="other") == 0
    assert value_of(samples, "otel_ml_nonfinite_total", metric="loss") == 1
    assert "loss" in _tags(tmp_path / "before")


def test_patch_covers_tensorboardx(tmp_path):
    tbx = pytest.importorskip("tensorboardX")
    start(tmp_path)
    tensorboard.patch()
    writer = tbx.SummaryWriter(str(tmp_path / "x"))
    writer.add_scalar("x/metric", 3.0, 1)
    writer.close()
    assert value_of(scrape(), "otel_ml_scalar", tag="x/metric") == 3.0


def test_tags_beyond_the_cap_are_dropped_and_counted(tmp_path, monkeypatch):
    telemetry = start(tmp_path)
    monkeypatch.setattr(tensorboard, "MAX_TAGS", 2)
    scalars = tensorboard._scalars()
    scalars.max_tags = 2
    for tag in ("a", "b", "c"):
        tensorboard.export_scalar(tag, 1.0)
    samples = scrape(telemetry)
    assert value_of(samples, "otel_ml_scalar", tag="c") is None
    assert value_of(samples, "otel_ml_export_dropped_total", signal="values") == 1

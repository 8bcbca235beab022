"""Helpers for the integration modules' tests: an in-process otel_ml, its /metrics, tiny models.

Example::

    telemetry = start(tmp_path)
    samples = scrape(telemetry)
    value_of(samples, "otel_ml_loss")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import otel_ml
from otel_ml.runtime import Telemetry
from tests.support.metrics import parse_exposition

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def options(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """init() options of an in-process test run: any free port, no files, no summary."""
    return {
        "prometheus_port": 0,
        "prometheus_host": "127.0.0.1",
        "run_dir": str(tmp_path / "{run_id}"),
        "run_id": "integration-unit",
        "files": "off",
        "summary": False,
        "set_global_providers": False,
        "handle_signals": False,
        **extra,
    }


def start(tmp_path: Path, **extra: Any) -> Telemetry:
    return otel_ml.init(**options(tmp_path, **extra))


def scrape(telemetry: Telemetry | None = None) -> dict[str, list[tuple[dict[str, str], float]]]:
    """One collection of the running (or given) instance, as /metrics would serve it."""
    telemetry = telemetry or otel_ml.get_telemetry()
    assert telemetry is not None and telemetry.prometheus_reader is not None
    return parse_exposition(telemetry.prometheus_reader.render().decode())


def value_of(samples: dict, name: str, **labels: str) -> float | None:
    """The value of the one sample ``name`` whose labels include ``labels`` (None when absent)."""
    found = [v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
    assert len(found) <= 1, f"{name}{labels}: {len(found)} samples"
    return found[0] if found else None


def tiny_gpt2(vocab: int = 64, positions: int = 16) -> Any:
    """A 2-layer GPT-2 built from a config (nothing downloaded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab, n_positions=positions, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


class TokenDataset:
    """Random token sequences with labels, in memory (a map-style dataset of dicts)."""

    def __init__(self, count: int = 64, length: int = 12, vocab: int = 64, seed: int = 0) -> None:
        import torch

        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (count, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        ids = self.ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def by_path(samples: dict, name: str = "otel_ml_span_duration_seconds_count") -> dict[str, float]:
    """``{path: value}`` of a region family (the count of the duration histogram by default)."""
    return {labels["path"]: v for labels, v in samples.get(name, []) if "path" in labels}

"""OtelMLCallback in TRL's SFTTrainer (a Trainer subclass): skipped unless trl is installed.

trl is not in the ``integrations`` extra (it brings datasets, pandas and pyarrow); install it to
run this check: ``pip install trl``.
"""

from __future__ import annotations

import pytest

from tests.support.integrations import by_path, options, scrape, tiny_gpt2, value_of

pytest.importorskip("trl")

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from otel_ml.integrations.transformers import OtelMLCallback


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny model's 64 ids, built in memory (nothing downloaded)."""
    vocab = {f"t{i}": i for i in range(62)} | {"[PAD]": 62, "[EOS]": 63}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]")


def test_sft_trainer_exports_the_raw_loss_regions_and_throughput(tmp_path):
    ids = torch.randint(0, 62, (32, 10), generator=torch.Generator().manual_seed(0)).tolist()
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=2,
        disable_tqdm=True,
    )
    callback = OtelMLCallback(**options(tmp_path))
    trainer = SFTTrainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": ids}),
        processing_class=_tokenizer(),
        callbacks=[callback],
    )
    trainer.train()
    samples = scrape()
    assert callback._tap.seen  # SFT's loss comes from the model: the raw per-step loss is exported
    assert value_of(samples, "otel_ml_step") == 4
    assert value_of(samples, "otel_ml_loss") is not None
    assert value_of(samples, "otel_ml_samples_total") == 16
    assert by_path(samples)["step"] == 4

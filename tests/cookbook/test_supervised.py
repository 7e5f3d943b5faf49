"""Supervised data, utils and the SFT loop (it must learn, pipeline, checkpoint and resume)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Literal

import pytest

from tinker_cookbook import checkpoint_utils
from tinker_cookbook.exceptions import ConfigurationError, DataError
from tinker_cookbook.renderers import TrainOnWhat, get_renderer
from tinker_cookbook.supervised import train
from tinker_cookbook.supervised.data import (
    ConversationDataset,
    ConversationFileBuilder,
    HFDatasetBuilder,
    conversation_to_datum,
    datum_from_tokens_weights,
    load_conversations_jsonl,
)
from tinker_cookbook.utils.cli import parse_cli
from tinker_cookbook.utils.lr_scheduling import lr_multiplier
from tinker_cookbook.utils.plotting import read_metrics

from .conftest import TINY

FACTS = [
    ("What colour is the sky on Zorblax?", "Pale green, because of copper dust."),
    ("How many moons does Zorblax have?", "Three: Pell, Orrin and Kesh."),
    ("What do people eat there?", "Moss cakes with glowberry jam."),
    ("How long is a day?", "A day lasts 31 hours."),
]


def write_conversations(path, n_copies=2):
    with open(path, "w") as f:
        for _ in range(n_copies):
            for q, a in FACTS:
                f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    return path


def test_datum_is_shifted_and_truncated():
    datum = datum_from_tokens_weights([5, 6, 7, 8], [0, 0, 1, 1], max_length=3)
    assert datum.model_input.to_ints() == [5, 6]
    assert datum.loss_fn_inputs["target_tokens"].tolist() == [6, 7]
    assert datum.loss_fn_inputs["weights"].tolist() == [0.0, 1.0]
    with pytest.raises(DataError, match="weights: expected one per token"):
        datum_from_tokens_weights([1, 2], [1.0])


def test_conversation_to_datum_trains_on_the_reply(tiny_tokenizer):
    renderer = get_renderer("chatml", tiny_tokenizer)
    q, a = FACTS[0]
    datum = conversation_to_datum(
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}], renderer, None,
        TrainOnWhat.LAST_ASSISTANT_MESSAGE,
    )
    targets = datum.loss_fn_inputs["target_tokens"].tolist()
    weights = datum.loss_fn_inputs["weights"].tolist()
    assert tiny_tokenizer.decode([t for t, w in zip(targets, weights, strict=True) if w]) == a + "<|im_end|>"


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "user"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: 'messages\[0\]': expected"):
        load_conversations_jsonl(path)
    path.write_text("{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: not valid JSON"):
        load_conversations_jsonl(path)


def test_file_and_hf_datasets_give_the_same_batches(tmp_path, tiny_tokenizer):
    datasets = pytest.importorskip("datasets")
    renderer = get_renderer("chatml", tiny_tokenizer)
    path = write_conversations(tmp_path / "c.jsonl")
    train_a, test_a = ConversationFileBuilder(str(path), batch_size=2, test_size=2)(renderer)
    train_b, test_b = HFDatasetBuilder("json", batch_size=2, data_files=str(path), test_size=2)(renderer)
    assert len(train_a) == len(train_b) == 3 and len(test_a) == len(test_b) == 1
    for i in range(len(train_a)):
        assert train_a.get_batch(i) == train_b.get_batch(i)
    rows = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS])
    assert len(ConversationDataset(rows, renderer, batch_size=2).get_batch(1)) == 2


def test_epochs_reshuffle(tmp_path, tiny_tokenizer):
    renderer = get_renderer("chatml", tiny_tokenizer)
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(8)]
    dataset = ConversationDataset(rows, renderer, batch_size=8)
    first = dataset.get_batch(0)
    dataset.set_epoch(1)
    second = dataset.get_batch(0)
    assert sorted(d.model_input.to_ints() for d in first) == sorted(d.model_input.to_ints() for d in second)
    assert first != second


def test_lr_schedules():
    assert lr_multiplier("linear", 0, 10) == 1.0 and lr_multiplier("linear", 5, 10) == 0.5
    assert lr_multiplier("cosine", 5, 10) == pytest.approx(0.5)
    assert lr_multiplier("constant", 9, 10) == 1.0
    assert lr_multiplier("linear", 0, 10, warmup_steps=4) == 0.25
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_multiplier("step", 0, 10)  # type: ignore[arg-type]


@dataclass
class _CLI:
    model_name: str
    steps: int = 3
    lr: float = 1e-4
    base_url: str | None = None
    mode: Literal["sync", "async"] = "sync"
    verbose: bool = False


def test_cli_parser_converts_and_names_bad_fields():
    cli = parse_cli(_CLI, ["model_name=tiny", "steps=5", "lr=3e-4", "base_url=None", "mode=async", "verbose=true"])
    assert cli == _CLI("tiny", 5, 3e-4, None, "async", True)
    with pytest.raises(ConfigurationError, match="steps: expected an int, got 'x'"):
        parse_cli(_CLI, ["model_name=a", "steps=x"])
    with pytest.raises(ConfigurationError, match=r"mode: expected one of \['sync', 'async'\]"):
        parse_cli(_CLI, ["model_name=a", "mode=fast"])
    with pytest.raises(ConfigurationError, match="stepz: not a field of _CLI; valid fields: model_name, steps"):
        parse_cli(_CLI, ["model_name=a", "stepz=1"])
    with pytest.raises(ConfigurationError, match="model_name: required"):
        parse_cli(_CLI, [])


def sft_config(log_path, data_path, **overrides) -> train.Config:
    fields = dict(
        log_path=str(log_path),
        model_name=TINY,
        dataset_builder=ConversationFileBuilder(str(data_path), batch_size=4, test_size=4),
        learning_rate=2e-3,
        lr_schedule="constant",
        num_epochs=20,
        max_steps=16,
        lora_rank=8,
        eval_every=8,
        save_every=8,
        seed=0,
    )
    return train.Config(**(fields | overrides))


@pytest.mark.slow
@pytest.mark.timeout(180)  # est. 30-60 s loaded
def test_sft_learns_and_resumes(tmp_path, embedded):
    """NLL on the training data falls (the tiny model memorises four facts) and so does test NLL;
    a run stopped at step 8 and resumed ends where an uninterrupted run ends."""
    data = write_conversations(tmp_path / "facts.jsonl")
    asyncio.run(train.main(sft_config(tmp_path / "full", data)))
    rows = read_metrics(tmp_path / "full" / "metrics.jsonl")
    nll = [r["train_mean_nll"] for r in rows if "train_mean_nll" in r]
    test_nll = [r["test/nll"] for r in rows if "test/nll" in r]
    assert len(nll) == 16 and nll[-1] < 0.5 * nll[0], nll
    assert len(test_nll) == 3 and test_nll[-1] < 0.5 * test_nll[0], test_nll  # steps 0, 8 and the end
    assert (tmp_path / "full" / "metrics.png").stat().st_size > 0
    records = checkpoint_utils.load_checkpoints(tmp_path / "full")
    assert [r["step"] for r in records] == [8, 16] and records[-1]["final"]
    assert records[-1]["sampler_path"].startswith("tinker://")

    # Interrupted after 8 steps (max_steps=8 saves a final checkpoint there), then resumed.
    asyncio.run(train.main(sft_config(tmp_path / "resumed", data, max_steps=8)))
    asyncio.run(train.main(sft_config(tmp_path / "resumed", data)))
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed if "train_mean_nll" in r] == list(range(16))
    resumed_nll = [r["train_mean_nll"] for r in resumed if "train_mean_nll" in r]
    # Same seed, data order and (restored) optimizer state: the same numbers.
    assert resumed_nll == pytest.approx(nll, rel=1e-4)

"""Hyper-parameter rules, math grading, evaluators and the metrics logger."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

import tinker
from tinker_cookbook.eval.evaluators import SamplingEvaluator
from tinker_cookbook.exceptions import ConfigurationError
from tinker_cookbook.hyperparam_utils import get_lora_param_count, get_lr, load_model_config
from tinker_cookbook.recipes.math_rl.math_grading import extract_final_number, grade_answer
from tinker_cookbook.renderers import get_renderer
from tinker_cookbook.utils.ml_log import MetricsLogger
from tinker_cookbook.utils.plotting import main as plot_main
from tinker_cookbook.utils.plotting import panel_series, read_metrics

from .conftest import SMOLLM2, TINY


def test_lr_rule_matches_tinkers_published_values(tmp_path):
    # Values from Thinking Machines' hyperparam_utils docs.
    assert get_lr("meta-llama/Llama-3.1-8B") == pytest.approx(2.86e-4, rel=0.01)
    assert get_lr("meta-llama/Llama-3.2-1B") == pytest.approx(4.91e-4, rel=0.01)
    assert get_lr("Qwen/Qwen3-8B") == pytest.approx(4.73e-4, rel=0.01)
    assert get_lr(TINY) > get_lr(SMOLLM2) > get_lr("meta-llama/Llama-3.1-8B")  # smaller models, larger LR
    folder = tmp_path / "mistral"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 4096, "model_type": "mistral"}))
    with pytest.raises(ConfigurationError, match="calibrated for Llama and Qwen models only"):
        get_lr(str(folder))
    with pytest.raises(ConfigurationError, match="model_name: "):
        get_lr("no-such/model-anywhere")


@pytest.mark.parametrize(
    "flags", [dict(), dict(train_unembed=False), dict(train_mlp=False, train_unembed=False), dict(train_attn=False)]
)
def test_lora_param_count_equals_the_backends_adapter(flags):
    """Count what the backend actually trains for the tiny model (its LoRA layers, on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tinker_backend import model_registry
    from tinker_backend.engine.lora import LoraRouting, attach_lora_layers, target_paths

    folder = model_registry.resolve_model(TINY)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    layers = attach_lora_layers(model, LoraRouting())
    rank = 8
    config = tinker.LoraConfig(rank=rank, **flags)
    actual = sum(rank * (layers[p].in_features + layers[p].out_features) for p in target_paths(layers, config))
    assert get_lora_param_count(TINY, lora_rank=rank, **flags) == actual
    assert get_lora_param_count(load_model_config(TINY), lora_rank=rank, **flags) == actual


def test_final_number_extraction_and_grading():
    assert extract_final_number("3 + 4 = 7") == "7"
    assert extract_final_number("It costs $1,234.50 in total.") == "1234.50"
    assert extract_final_number("First 12, then... Answer: 42. Check: 40 + 2") == "42"
    assert extract_final_number("so \\boxed{3/4}") == "3/4"
    assert extract_final_number("no digits") is None
    assert grade_answer("The answer is 4.0", "4") and grade_answer("0.75", "3/4")
    assert not grade_answer("5", "4") and not grade_answer("", "4")


def test_sampling_evaluator_scores_a_sampler(embedded):
    service = tinker.ServiceClient()
    sampler = service.create_sampling_client(base_model=TINY)
    renderer = get_renderer("chatml", sampler.get_tokenizer())
    prompts = [[{"role": "user", "content": f"Say {i}"}] for i in range(3)]
    seen = []

    def grader(reply, index):
        seen.append(index)
        return 1.0 if index == 0 else 0.0

    evaluator = SamplingEvaluator(prompts, grader, renderer, max_tokens=4)
    metrics = asyncio.run(evaluator(sampler))
    assert sorted(seen) == [0, 1, 2]
    assert metrics["test/score"] == pytest.approx(1 / 3)
    assert 0.0 <= metrics["test/clean_stop"] <= 1.0


def test_metrics_logger_writes_jsonl_config_table_and_plot(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, config={"lr": 1e-3}, plot_every=0)
    for step in range(3):
        logger.log_metrics({"train_mean_nll": 3.0 - step, "learning_rate": torch.tensor(1e-3)}, step=step)
    logger.close()
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 1e-3}
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["train_mean_nll"] for r in rows] == [3.0, 2.0, 1.0]
    assert rows[0]["learning_rate"] == pytest.approx(1e-3)
    assert "train_mean_nll  1" in capsys.readouterr().out
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Resuming at step 2 drops the rows of steps that will run again.
    MetricsLogger(tmp_path, resume_step=2).close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1]


def test_panels_from_several_runs_and_their_command_line(tmp_path, capsys):
    for stage, values in (("sft", [3.0, 2.5]), ("rl", [0.5, 0.6, 0.7])):
        (tmp_path / stage).mkdir()
        rows = [{"step": i, "loss": v, "other": "text"} for i, v in enumerate(values)]
        (tmp_path / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft, rl = tmp_path / "sft" / "metrics.jsonl", tmp_path / "rl" / "metrics.jsonl"
    # Panels keep their order; a key without numbers in a run is left out.
    assert panel_series([(rl, "loss", "rl"), (sft, "loss", "sft"), (sft, "other", "sft"), (sft, "missing", "")]) == [
        ("rl loss", [(0, 0.5), (1, 0.6), (2, 0.7)]),
        ("sft loss", [(0, 3.0), (1, 2.5)]),
    ]
    out = tmp_path / "curves.png"
    plot_main([str(out), f"sft={sft}:loss", f"{rl}:loss,missing"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        plot_main([str(out), str(sft)])
    assert "panels: expected [LABEL=]METRICS_JSONL:KEY[,KEY...], got" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot_main([str(out), f"{sft}:missing"])
    assert "panels: none of the keys has data" in capsys.readouterr().err

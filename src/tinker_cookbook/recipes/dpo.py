"""Direct Preference Optimization with the library loop (``tinker_cookbook.preference.train_dpo``).

The bundled data (``example_data/comparisons.jsonl``) holds 64 arithmetic questions for a
"calculator" system prompt, each with a correct, terse answer (chosen) and a wrong one that
is either terse or rambling (rejected); A/B order is random. The first ``test_size`` pairs
are held out and scored every ``eval_every`` steps (``test/dpo_loss``, ``test/accuracy``).
The reference is the initial weights (a frozen sampler). ``file_path=`` trains on your own
comparisons JSONL (``{"prompt_conversation", "completion_A", "completion_B", "label"}``).

    python -m tinker_cookbook.recipes.dpo
    python -m tinker_cookbook.recipes.dpo model_name=tiny-llama max_steps=2 log_path=/tmp/dpo
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from importlib import resources

from tinker_cookbook.preference import train_dpo
from tinker_cookbook.preference.datasets import ComparisonFileBuilder
from tinker_cookbook.utils.cli import parse_cli
from tinker_cookbook.utils.lr_scheduling import LRSchedule
from tinker_cookbook.utils.misc import IfExists, check_log_dir

BUNDLED = str(resources.files("tinker_cookbook") / "example_data" / "comparisons.jsonl")


@dataclass
class CLIConfig:
    model_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    log_path: str = "runs/dpo"
    file_path: str = BUNDLED
    renderer_name: str | None = None
    max_steps: int | None = 12
    num_epochs: int = 3
    batch_size: int = 4
    test_size: int = 8
    beta: float = 0.1
    learning_rate: float = 2e-4
    lr_schedule: LRSchedule = "constant"
    lora_rank: int = 16
    max_length: int = 256
    eval_every: int = 6
    save_every: int = 0
    submit_ahead: int = 1
    base_url: str | None = None
    wandb_project: str | None = None
    seed: int | None = 0  # LoRA initialisation; None: random
    if_exists: IfExists = "raise"


def build_config(cli: CLIConfig) -> train_dpo.Config:
    return train_dpo.Config(
        log_path=cli.log_path,
        model_name=cli.model_name,
        renderer_name=cli.renderer_name,
        dataset_builder=ComparisonFileBuilder(cli.file_path, cli.batch_size, cli.test_size),
        beta=cli.beta,
        learning_rate=cli.learning_rate,
        lr_schedule=cli.lr_schedule,
        num_epochs=cli.num_epochs,
        max_steps=cli.max_steps,
        max_length=cli.max_length,
        lora_rank=cli.lora_rank,
        base_url=cli.base_url,
        eval_every=cli.eval_every,
        save_every=cli.save_every,
        submit_ahead=cli.submit_ahead,
        wandb_project=cli.wandb_project,
        seed=cli.seed,
    )


if __name__ == "__main__":
    cli = parse_cli(CLIConfig)
    check_log_dir(cli.log_path, cli.if_exists)
    asyncio.run(train_dpo.main(build_config(cli)))

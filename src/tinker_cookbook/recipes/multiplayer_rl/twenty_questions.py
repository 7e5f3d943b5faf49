"""Twenty questions: the policy asks, a frozen sampler of the base model that knows the secret
answers (``tinker_cookbook.multiplayer_rl.twenty_questions``). Reward: 1 for naming the
secret animal, plus ``question_bonus`` for asking questions.

    python -m tinker_cookbook.recipes.multiplayer_rl.twenty_questions
    python -m tinker_cookbook.recipes.multiplayer_rl.twenty_questions model_name=tiny-llama max_steps=2 log_path=/tmp/tq
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tinker_cookbook.multiplayer_rl.twenty_questions import TwentyQuestionsDatasetBuilder
from tinker_cookbook.rl import train
from tinker_cookbook.utils.cli import parse_cli
from tinker_cookbook.utils.misc import IfExists, check_log_dir


@dataclass
class CLIConfig:
    model_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    log_path: str = "runs/twenty_questions"
    max_steps: int = 12
    batch_size: int = 4
    group_size: int = 8
    max_questions: int = 4
    question_bonus: float = 0.2
    max_tokens: int = 16
    learning_rate: float = 4e-4
    lora_rank: int = 16
    seed: int | None = 0  # secrets, LoRA initialisation and sampling seeds; None: random
    base_url: str | None = None
    if_exists: IfExists = "raise"


def build_config(cli: CLIConfig) -> train.Config:
    return train.Config(
        log_path=cli.log_path,
        model_name=cli.model_name,
        dataset_builder=TwentyQuestionsDatasetBuilder(
            cli.model_name, cli.batch_size, cli.group_size, cli.max_steps, cli.seed or 0, cli.max_questions,
            cli.question_bonus, base_url=cli.base_url,
        ),
        learning_rate=cli.learning_rate,
        max_tokens=cli.max_tokens,
        lora_rank=cli.lora_rank,
        max_steps=cli.max_steps,
        save_every=0,
        base_url=cli.base_url,
        seed=cli.seed,
    )


if __name__ == "__main__":
    cli = parse_cli(CLIConfig)
    check_log_dir(cli.log_path, cli.if_exists)
    asyncio.run(train.main(build_config(cli)))

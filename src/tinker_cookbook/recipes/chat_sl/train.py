"""Multi-turn chat SFT: the library assistant's conversations, with a choice of which tokens to train.

Conversations are generated offline (``chat_sl/data.py``: a system prompt and three user turns
whose later questions refer back to the first answer). ``train_on`` picks the weights:
``last_assistant_message`` (only the final answer), ``all_assistant_messages`` (every answer,
the default) or ``all_messages`` (user and system text too; headers never). Held-out
conversations, in phrasings never seen in training, are scored on every assistant message
(``test/nll``) before training, every ``eval_every`` steps and at the end.

    python -m tinker_cookbook.recipes.chat_sl.train
    python -m tinker_cookbook.recipes.chat_sl.train train_on=last_assistant_message
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from tinker_cookbook.recipes.chat_sl.data import LibraryChatBuilder
from tinker_cookbook.renderers import TrainOnWhat
from tinker_cookbook.supervised import train
from tinker_cookbook.utils.cli import parse_cli
from tinker_cookbook.utils.lr_scheduling import LRSchedule
from tinker_cookbook.utils.misc import IfExists, check_log_dir


@dataclass
class CLIConfig:
    model_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    log_path: str = "runs/chat_sl"
    renderer_name: str | None = None
    train_on: Literal["last_assistant_message", "all_assistant_messages", "all_messages"] = "all_assistant_messages"
    max_steps: int | None = 12
    num_epochs: int = 1
    batch_size: int = 8
    train_size: int = 96
    test_size: int = 16
    learning_rate: float = 5e-4
    lr_schedule: LRSchedule = "linear"
    lora_rank: int = 16
    max_length: int = 256
    eval_every: int = 4
    save_every: int = 0
    submit_ahead: int = 1
    seed: int = 0
    base_url: str | None = None
    wandb_project: str | None = None
    if_exists: IfExists = "raise"


def build_config(cli: CLIConfig) -> train.Config:
    return train.Config(
        log_path=cli.log_path,
        model_name=cli.model_name,
        renderer_name=cli.renderer_name,
        dataset_builder=LibraryChatBuilder(cli.batch_size, cli.train_size, cli.test_size, TrainOnWhat(cli.train_on),
                                           cli.max_length, cli.seed),
        learning_rate=cli.learning_rate,
        lr_schedule=cli.lr_schedule,
        num_epochs=cli.num_epochs,
        max_steps=cli.max_steps,
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
    asyncio.run(train.main(build_config(cli)))

"""Supervised fine-tuning with the library loop (``tinker_cookbook.supervised.train``).

Same data as ``sl_loop`` (the bundled Zorblax chat examples), with what a real run needs:
a held-out set scored every ``eval_every`` steps (``test/nll``, on rephrased questions),
a linear LR schedule, pipelined submission (``submit_ahead``), and checkpoints in
``checkpoints.jsonl`` every ``save_every`` steps (rerun with ``if_exists=resume`` to continue).
``file_path=`` trains on your own ``{"messages": [...]}`` JSONL instead.

    python -m tinker_cookbook.recipes.sl_basic
    python -m tinker_cookbook.recipes.sl_basic model_name=tiny-llama max_steps=2 log_path=/tmp/sl_basic
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from importlib import resources

from tinker_cookbook.renderers import TrainOnWhat
from tinker_cookbook.supervised import train
from tinker_cookbook.supervised.data import ConversationFileBuilder
from tinker_cookbook.utils.cli import parse_cli
from tinker_cookbook.utils.lr_scheduling import LRSchedule
from tinker_cookbook.utils.misc import IfExists, check_log_dir

BUNDLED = str(resources.files("tinker_cookbook") / "example_data" / "conversations.jsonl")


@dataclass
class CLIConfig:
    model_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    log_path: str = "runs/sl_basic"
    file_path: str = BUNDLED
    renderer_name: str | None = None
    max_steps: int | None = 12
    num_epochs: int = 2
    batch_size: int = 8
    test_size: int = 12
    learning_rate: float = 5e-4
    lr_schedule: LRSchedule = "linear"
    lora_rank: int = 16
    max_length: int = 256
    eval_every: int = 4
    save_every: int = 6
    submit_ahead: int = 1
    base_url: str | None = None
    wandb_project: str | None = None
    seed: int | None = 0  # LoRA initialisation and data order; None: random
    if_exists: IfExists = "raise"


def build_config(cli: CLIConfig) -> train.Config:
    return train.Config(
        log_path=cli.log_path,
        model_name=cli.model_name,
        renderer_name=cli.renderer_name,
        dataset_builder=ConversationFileBuilder(
            cli.file_path, cli.batch_size, cli.max_length, cli.test_size, TrainOnWhat.ALL_ASSISTANT_MESSAGES
        ),
        learning_rate=cli.learning_rate,
        lr_schedule=cli.lr_schedule,
        num_epochs=cli.num_epochs,
        max_steps=cli.max_steps,
        lora_rank=cli.lora_rank,
        base_url=cli.base_url,
        seed=cli.seed,
        eval_every=cli.eval_every,
        save_every=cli.save_every,
        submit_ahead=cli.submit_ahead,
        wandb_project=cli.wandb_project,
    )


if __name__ == "__main__":
    cli = parse_cli(CLIConfig)
    check_log_dir(cli.log_path, cli.if_exists)
    asyncio.run(train.main(build_config(cli)))

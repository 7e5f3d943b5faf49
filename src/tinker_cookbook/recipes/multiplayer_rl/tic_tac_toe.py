"""Tic-tac-toe self-play: both players are the policy being trained
(``tinker_cookbook.multiplayer_rl.tic_tac_toe``). A group is both sides of ``games_per_group``
games; the reward (win/draw/loss, an illegal move forfeits, plus ``move_bonus`` times the mean
move score) first teaches legal play.

    python -m tinker_cookbook.recipes.multiplayer_rl.tic_tac_toe
    python -m tinker_cookbook.recipes.multiplayer_rl.tic_tac_toe model_name=tiny-llama max_steps=2 log_path=/tmp/ttt
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tinker_cookbook.multiplayer_rl.tic_tac_toe import SelfPlayDatasetBuilder
from tinker_cookbook.rl import train
from tinker_cookbook.utils.cli import parse_cli
from tinker_cookbook.utils.misc import IfExists, check_log_dir


@dataclass
class CLIConfig:
    model_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    log_path: str = "runs/tic_tac_toe"
    max_steps: int = 12
    batch_size: int = 4
    games_per_group: int = 4
    move_bonus: float = 0.5  # shaping: weight of the mean move score (1 legal, 0.5 a number, 0 none)
    max_tokens: int = 8
    learning_rate: float = 4e-4
    lora_rank: int = 16
    seed: int | None = 0  # illegal-move replacements, LoRA initialisation and sampling seeds; None: random
    base_url: str | None = None
    if_exists: IfExists = "raise"


def build_config(cli: CLIConfig) -> train.Config:
    return train.Config(
        log_path=cli.log_path,
        model_name=cli.model_name,
        dataset_builder=SelfPlayDatasetBuilder(cli.batch_size, cli.games_per_group, cli.max_steps, cli.seed or 0,
                                               cli.move_bonus),
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

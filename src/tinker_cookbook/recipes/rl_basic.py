"""RL with the library loop (``tinker_cookbook.rl.train``) on generated sums.

The template to copy for a new task: a flat ``CLIConfig``, a dataset builder of env groups
(here ``MathDatasetBuilder(env="arithmetic")``, see ``math_rl/envs.py``), and
``asyncio.run(train.main(config))``. ``mode=sync`` (on-policy, sample then train),
``mode=stream`` (train minibatches as their groups finish) or ``mode=async`` (sample from
the latest policy while training, at most ``max_steps_off_policy`` steps stale).

    python -m tinker_cookbook.recipes.rl_basic
    python -m tinker_cookbook.recipes.rl_basic mode=async max_steps_off_policy=1
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from tinker_cookbook.recipes.math_rl.envs import MathDatasetBuilder
from tinker_cookbook.rl import train
from tinker_cookbook.utils.cli import parse_cli
from tinker_cookbook.utils.misc import IfExists, check_log_dir


@dataclass
class CLIConfig:
    model_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    log_path: str = "runs/rl_basic"
    max_steps: int = 12
    batch_size: int = 4
    group_size: int = 8
    max_tokens: int = 16
    learning_rate: float = 4e-4
    lora_rank: int = 16
    mode: Literal["sync", "stream", "async"] = "sync"
    max_steps_off_policy: int = 1
    base_url: str | None = None
    seed: int | None = 0  # LoRA initialisation and sampling seeds; None: random
    if_exists: IfExists = "raise"


def build_config(cli: CLIConfig) -> train.Config:
    return train.Config(
        log_path=cli.log_path,
        model_name=cli.model_name,
        dataset_builder=MathDatasetBuilder("arithmetic", cli.batch_size, cli.group_size, n_batches=cli.max_steps),
        learning_rate=cli.learning_rate,
        max_tokens=cli.max_tokens,
        remove_constant_reward_groups=True,  # groups where all answers tie carry no signal
        lora_rank=cli.lora_rank,
        max_steps=cli.max_steps,
        save_every=0,
        base_url=cli.base_url,
        seed=cli.seed,
        stream_minibatch=train.StreamMinibatchConfig() if cli.mode == "stream" else None,
        async_config=train.AsyncConfig(cli.max_steps_off_policy) if cli.mode == "async" else None,
    )


if __name__ == "__main__":
    cli = parse_cli(CLIConfig)
    check_log_dir(cli.log_path, cli.if_exists)
    asyncio.run(train.main(build_config(cli)))

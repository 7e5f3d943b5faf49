"""Prompt distillation: teach the student to reply in French without being told to.

The teacher is the base model with the system prompt ``Always reply in French.``; it answers
generated everyday questions, and the student (a fresh LoRA on the same base model) is
fine-tuned on those answers with no system prompt (``distillation.prompt_distillation``).
``behaviour/score`` is the share of the student's greedy answers to held-out questions that
read as French (more French than English function words); ``behaviour/teacher_score`` is the
prompted teacher's share on the same questions.

    python -m tinker_cookbook.recipes.prompt_distillation
    python -m tinker_cookbook.recipes.prompt_distillation model_name=tiny-llama max_steps=2 log_path=/tmp/pd \
        filter_by_behaviour=false drop_truncated=false   # the random tiny model neither stops nor speaks French
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
from dataclasses import dataclass

from tinker_cookbook.distillation import prompt_distillation
from tinker_cookbook.utils.cli import parse_cli
from tinker_cookbook.utils.misc import IfExists, check_log_dir

SYSTEM_PROMPT = "Always reply in French."
TOPICS = [
    "the sun", "rain", "cats", "dogs", "bread", "coffee", "the ocean", "trees", "music", "books",
    "bicycles", "winter", "apples", "the moon", "birds", "cheese", "mountains", "trains",
]
TEMPLATES = ["What is {}?", "Why do people like {}?", "Tell me something about {}.", "Describe {} in one sentence."]
_FRENCH = set(
    "le la les l de des du d est et un une je j il elle nous vous ils ce c qu que qui pas ne n en dans pour "
    "sur avec mais ou au aux sont à très plus son sa ses leur cette".split()
)
_ENGLISH = set("the is and of a an to in it that you are i for with this on as be what my can they".split())


def generated_questions(seed: int = 0) -> list[str]:
    """Every template x topic question (72), in a seeded shuffled order."""
    questions = [t.format(topic) for t, topic in itertools.product(TEMPLATES, TOPICS)]
    random.Random(seed).shuffle(questions)
    return questions


def looks_french(text: str) -> float:
    """1.0 if the text has more French than English function words, else 0.0."""
    words = re.findall(r"[a-zàâçéèêëîïôûùüÿœ]+", text.lower())
    french = sum(w in _FRENCH for w in words)
    english = sum(w in _ENGLISH for w in words)
    return float(french > english)


@dataclass
class CLIConfig:
    model_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    log_path: str = "runs/prompt_distillation"
    teacher_model: str | None = None  # None: the base model itself, prompted
    system_prompt: str = SYSTEM_PROMPT
    test_size: int = 8
    samples_per_query: int = 4  # about 1 in 4 of SmolLM2's answers ends in time and is French
    teacher_max_tokens: int = 64
    filter_by_behaviour: bool = True  # train only on teacher answers that are French
    drop_truncated: bool = True  # train only on teacher answers that ended by themselves
    max_steps: int | None = 12
    num_epochs: int = 2
    batch_size: int = 8
    learning_rate: float = 5e-4
    lora_rank: int = 16
    eval_every: int = 6
    eval_max_tokens: int = 24
    base_url: str | None = None
    wandb_project: str | None = None
    seed: int | None = 0  # LoRA initialisation and sampling seeds; None: random
    if_exists: IfExists = "raise"


def build_config(cli: CLIConfig) -> prompt_distillation.Config:
    questions = generated_questions()
    return prompt_distillation.Config(
        log_path=cli.log_path,
        model_name=cli.model_name,
        system_prompt=cli.system_prompt,
        queries=questions[cli.test_size :],
        test_queries=questions[: cli.test_size],
        behaviour=looks_french,
        filter_by_behaviour=cli.filter_by_behaviour,
        drop_truncated=cli.drop_truncated,
        teacher_model=cli.teacher_model,
        samples_per_query=cli.samples_per_query,
        teacher_max_tokens=cli.teacher_max_tokens,
        batch_size=cli.batch_size,
        learning_rate=cli.learning_rate,
        num_epochs=cli.num_epochs,
        max_steps=cli.max_steps,
        lora_rank=cli.lora_rank,
        max_length=256,
        eval_every=cli.eval_every,
        eval_max_tokens=cli.eval_max_tokens,
        base_url=cli.base_url,
        seed=cli.seed,
        wandb_project=cli.wandb_project,
    )


if __name__ == "__main__":
    cli = parse_cli(CLIConfig)
    check_log_dir(cli.log_path, cli.if_exists)
    asyncio.run(prompt_distillation.main(build_config(cli)))

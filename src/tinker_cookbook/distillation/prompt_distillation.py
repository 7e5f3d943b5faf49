"""Prompt (context) distillation: bake a system prompt into the weights.

1. The teacher (``teacher_model``, by default the student's own base model) answers every
   query with ``system_prompt`` in front; answers cut off at ``teacher_max_tokens`` are
   dropped unless ``drop_truncated=False`` (so the student does not learn to stop
   mid-sentence), and with
   ``filter_by_behaviour`` so are answers that fail ``behaviour``. The kept pairs go to
   ``log_path/teacher_data.jsonl`` as ``[user, assistant]`` conversations, without the
   system prompt (a rerun on the same ``log_path`` reuses the file).
2. The student is fine-tuned on them with the supervised loop (``supervised.train``), so
   the metrics are its ``train_mean_nll`` etc.; the answers to ``test_queries`` are held out
   for ``test/nll``.
3. With ``behaviour`` (a grader of one reply, 1.0 = behaves as the prompt asks) and
   ``test_queries``, the student answers the test queries *without* the system prompt before
   steps 0, ``eval_every``, ... and after the last: ``behaviour/score`` is its mean grade,
   ``behaviour/teacher_score`` the teacher's on the same queries (the target).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import tinker
from tinker_cookbook.completers import TinkerTokenCompleter
from tinker_cookbook.distillation.on_policy import create_teacher
from tinker_cookbook.eval.evaluators import SamplingEvaluator, TrainingClientEvaluator
from tinker_cookbook.exceptions import DataError
from tinker_cookbook.renderers import Message, Renderer, TrainOnWhat, get_renderer
from tinker_cookbook.supervised import train
from tinker_cookbook.supervised.data import ConversationFileBuilder
from tinker_cookbook.training_run import create_service_client, resolve_renderer_name
from tinker_cookbook.utils.lr_scheduling import LRSchedule

logger = logging.getLogger(__name__)

TEACHER_DATA_FILE = "teacher_data.jsonl"


@dataclass
class Config:
    log_path: str
    model_name: str
    system_prompt: str
    queries: Sequence[str]
    test_queries: Sequence[str] = ()
    behaviour: Callable[[str], float] | None = None  # grades one reply; 1.0 = as the system prompt asks
    filter_by_behaviour: bool = False  # keep only teacher answers with behaviour(answer) > 0.5
    drop_truncated: bool = True  # drop teacher answers that hit teacher_max_tokens
    teacher_model: str | None = None  # a base model name or tinker://.../sampler_weights/...; None: model_name
    samples_per_query: int = 1
    teacher_max_tokens: int = 64
    teacher_temperature: float = 0.7
    renderer_name: str | None = None  # None: the model's recommended renderer
    batch_size: int = 8
    learning_rate: float = 1e-4
    lr_schedule: LRSchedule = "linear"
    num_epochs: int = 1
    max_steps: int | None = None
    lora_rank: int = 32
    max_length: int | None = 512
    eval_every: int = 10  # 0: only at the end
    eval_max_tokens: int = 32
    save_every: int = 0  # 0: only at the end
    base_url: str | None = None
    wandb_project: str | None = None
    seed: int | None = None
    extra_evaluators: list[TrainingClientEvaluator] = field(default_factory=list)


@dataclass
class TeacherAnswer:
    query: str
    answer: str
    clean_stop: bool


async def generate_teacher_answers(
    teacher: tinker.SamplingClient, renderer: Renderer, system_prompt: str, queries: Sequence[str],
    samples_per_query: int, max_tokens: int, temperature: float, seed: int | None = None,
) -> list[TeacherAnswer]:
    """``samples_per_query`` answers per query from the teacher prompted with ``system_prompt``
    (all requests in flight at once; one query's samples share one ``sample`` call; ``seed``
    makes the answers reproducible)."""
    completer = TinkerTokenCompleter(teacher, max_tokens, temperature, seed)
    stop = renderer.get_stop_sequences()
    prompts = [
        renderer.build_generation_prompt([Message(role="system", content=system_prompt), Message(role="user", content=q)])
        for q in queries
    ]
    results = await asyncio.gather(*(completer(p, stop) for p in prompts for _ in range(samples_per_query)))
    answers = []
    for i, result in enumerate(results):
        message, clean = renderer.parse_response(result.tokens)
        answers.append(TeacherAnswer(queries[i // samples_per_query], message["content"], clean))
    return answers


def write_conversations(answers: Sequence[TeacherAnswer], path: Path) -> None:
    """One ``{"messages": [user, assistant]}`` line per answer (no system prompt)."""
    with open(path, "w") as f:
        for a in answers:
            messages = [{"role": "user", "content": a.query}, {"role": "assistant", "content": a.answer}]
            f.write(json.dumps({"messages": messages}) + "\n")


class BehaviourEvaluator(TrainingClientEvaluator):
    """Snapshots the current weights into a sampler and grades its greedy answers to
    ``queries`` (no system prompt) with ``behaviour``: ``behaviour/score``,
    ``behaviour/clean_stop`` and the constant ``behaviour/teacher_score``."""

    def __init__(
        self, queries: Sequence[str], behaviour: Callable[[str], float], renderer: Renderer, max_tokens: int,
        teacher_score: float,
    ) -> None:
        prompts = [[Message(role="user", content=q)] for q in queries]
        self.sampling_evaluator = SamplingEvaluator(
            prompts, lambda reply, _: behaviour(reply["content"]), renderer, max_tokens, name="behaviour"
        )
        self.teacher_score = teacher_score

    async def __call__(self, training_client: tinker.TrainingClient) -> dict[str, float]:
        sampler = training_client.save_weights_and_get_sampling_client()
        metrics = await self.sampling_evaluator(sampler)
        return {**metrics, "behaviour/teacher_score": self.teacher_score}


def _keep(answer: TeacherAnswer, config: Config) -> bool:
    if (config.drop_truncated and not answer.clean_stop) or not answer.answer.strip():
        return False
    return not (config.filter_by_behaviour and config.behaviour is not None and config.behaviour(answer.answer) <= 0.5)


async def build_teacher_data(
    config: Config, renderer: Renderer, teacher: tinker.SamplingClient
) -> tuple[Path, int, float]:
    """Write (or reuse) ``teacher_data.jsonl``; the test answers come first. Returns the path,
    the number of test rows and the teacher's mean behaviour grade on the test queries."""
    path = Path(config.log_path) / TEACHER_DATA_FILE
    meta_path = path.with_suffix(".meta.json")
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return path, meta["test_size"], meta["teacher_score"]
    queries = [*config.test_queries, *config.queries]
    answers = await generate_teacher_answers(
        teacher, renderer, config.system_prompt, queries, config.samples_per_query,
        config.teacher_max_tokens, config.teacher_temperature, config.seed,
    )
    n_test = len(config.test_queries) * config.samples_per_query
    test, rest = answers[:n_test], answers[n_test:]
    teacher_score = float(np.mean([config.behaviour(a.answer) for a in test])) if config.behaviour and test else float("nan")
    kept_test, kept_train = [a for a in test if _keep(a, config)], [a for a in rest if _keep(a, config)]
    logger.info("teacher answers kept: %d/%d train, %d/%d test", len(kept_train), len(rest), len(kept_test), len(test))
    if len(kept_train) < config.batch_size:
        raise DataError(
            f"queries: only {len(kept_train)} of {len(rest)} teacher answers kept (drop_truncated="
            f"{config.drop_truncated}, filter_by_behaviour={config.filter_by_behaviour}), fewer than "
            f"batch_size={config.batch_size}; raise teacher_max_tokens or samples_per_query, or add queries"
        )
    Path(config.log_path).mkdir(parents=True, exist_ok=True)
    write_conversations([*kept_test, *kept_train], path)
    meta_path.write_text(json.dumps({"test_size": len(kept_test), "teacher_score": teacher_score}))
    return path, len(kept_test), teacher_score


async def main(config: Config) -> None:
    """Generate the teacher's answers, then fine-tune the student on them."""
    service = create_service_client(config)
    renderer_name = resolve_renderer_name(config)
    teacher = create_teacher(service, config.teacher_model or config.model_name)
    renderer = get_renderer(renderer_name, (await teacher).get_tokenizer())  # the student's tokenizer too
    path, test_size, teacher_score = await build_teacher_data(config, renderer, teacher)
    evaluators = list(config.extra_evaluators)
    if config.behaviour is not None and config.test_queries:
        evaluators.append(
            BehaviourEvaluator(config.test_queries, config.behaviour, renderer, config.eval_max_tokens, teacher_score)
        )
    await train.main(
        train.Config(
            log_path=config.log_path,
            model_name=config.model_name,
            renderer_name=renderer_name,
            dataset_builder=ConversationFileBuilder(
                str(path), config.batch_size, config.max_length, test_size, TrainOnWhat.LAST_ASSISTANT_MESSAGE
            ),
            learning_rate=config.learning_rate,
            lr_schedule=config.lr_schedule,
            num_epochs=config.num_epochs,
            max_steps=config.max_steps,
            lora_rank=config.lora_rank,
            base_url=config.base_url,
            eval_every=config.eval_every,
            save_every=config.save_every,
            evaluators=evaluators,
            wandb_project=config.wandb_project,
            seed=config.seed,
        )
    )

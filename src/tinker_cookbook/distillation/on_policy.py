"""On-policy distillation: the student samples, the teacher grades every sampled token.

Each step snapshots the student into a sampler and samples ``group_size`` replies to each of
the batch's prompts (prompt-only envs, :mod:`~tinker_cookbook.distillation.datasets`). The
teacher, a ``SamplingClient``, scores the same reply tokens with ``compute_logprobs`` after
its own prompt (which may hold a system prompt the student never sees). The per-token
advantage is the negative reverse-KL estimate

    advantage_t = -kl_coef * (logp_student(x_t) - logp_teacher(x_t))

on sampled tokens (0 elsewhere), where ``logp_student`` is the sampler's logprob. The
``importance_sampling`` loss with those sampler logprobs then moves the student toward the
teacher on the states the student itself visits. The reverse KL is mode-seeking: the student
is pushed off tokens the teacher finds unlikely rather than made to cover all of the teacher.

Metrics per step: ``teacher_kl`` (mean ``logp_student - logp_teacher`` over sampled tokens,
an estimate of the per-token KL(student || teacher)), ``optim/kl_sample_train_v1``/``_v2``,
``env/all/ac_tokens``, and ``time/sample``, ``time/teacher``, ``time/train``, ``time/step``.
With a test set, ``test/teacher_kl`` before steps 0, ``eval_every``, ... and after the last.

Simplifications: single-turn prompts, one teacher, no discounting of future tokens' KL.
The teacher must share the student's tokenizer (e.g. the same base model, or a
``tinker://.../sampler_weights/...`` checkpoint of one).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np

import tinker
from tinker_cookbook.completers import TinkerTokenCompleter, derive_seed
from tinker_cookbook.distillation.datasets import PromptGroupBuilder
from tinker_cookbook.eval.evaluators import SamplingClientEvaluator
from tinker_cookbook.exceptions import ConfigurationError
from tinker_cookbook.rl.data_processing import trajectory_to_data
from tinker_cookbook.rl.metrics import compute_kl_sample_train, compute_trajectory_metrics
from tinker_cookbook.rl.rollouts import do_group_rollout
from tinker_cookbook.rl.types import RLDataset, RLDatasetBuilder, TrajectoryGroup
from tinker_cookbook.training_run import count_steps, start_training_run
from tinker_cookbook.utils.misc import progress, timed

logger = logging.getLogger(__name__)


@dataclass
class Config:
    log_path: str
    model_name: str
    dataset_builder: RLDatasetBuilder  # its batches must be PromptGroupBuilders
    teacher_model: str | None = None  # a base model name or tinker://.../sampler_weights/...; None: model_name
    kl_coef: float = 1.0
    learning_rate: float = 1e-4
    max_tokens: int = 64
    temperature: float = 1.0
    lora_rank: int = 32
    renderer_name: str | None = None  # None: the model's recommended renderer
    loss_fn: str = "importance_sampling"
    loss_fn_config: dict[str, float] | None = None
    max_steps: int | None = None  # None: one pass over the dataset
    eval_every: int = 10  # 0: only at the end
    save_every: int = 20  # 0: only at the end
    base_url: str | None = None
    load_checkpoint_path: str | None = None
    evaluators: list[SamplingClientEvaluator] = field(default_factory=list)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    wandb_project: str | None = None
    seed: int | None = None  # LoRA initialisation and sampling seeds; None: random


def create_teacher(service: tinker.ServiceClient, teacher_model: str) -> tinker.SamplingClient:
    """A sampler for a ``tinker://`` sampler checkpoint, or for a plain base model."""
    if teacher_model.startswith("tinker://"):
        return service.create_sampling_client(model_path=teacher_model)
    return service.create_sampling_client(base_model=teacher_model)


def reverse_kl_advantages(
    student_logprobs: np.ndarray, teacher_logprobs: np.ndarray, mask: np.ndarray, kl_coef: float
) -> np.ndarray:
    """``-kl_coef * mask * (student - teacher)``: positive where the teacher likes a sampled
    token more than the student does, negative where less, 0 off the mask."""
    return (-kl_coef * mask * (student_logprobs - teacher_logprobs)).astype(np.float32)


async def teacher_logprobs_of_reply(
    teacher: tinker.SamplingClient, teacher_prompt: tinker.ModelInput, datum: tinker.Datum, mask: np.ndarray
) -> np.ndarray:
    """The teacher's logprob of each sampled target of ``datum`` (at the mask's positions, 0
    elsewhere), scored after ``teacher_prompt`` instead of the student's prompt."""
    reply = datum.loss_fn_inputs["target_tokens"].to_numpy()[mask > 0].tolist()
    out = np.zeros(len(mask), dtype=np.float32)
    if not reply:
        return out
    logprobs = await teacher.compute_logprobs(tinker.ModelInput.from_ints(teacher_prompt.to_ints() + reply))
    out[mask > 0] = np.asarray(logprobs[teacher_prompt.length :], dtype=np.float32)
    return out


async def distillation_data(
    groups_P: list[TrajectoryGroup],
    builders_P: list[PromptGroupBuilder],
    teacher: tinker.SamplingClient,
    kl_coef: float,
) -> tuple[list[tinker.Datum], list[np.ndarray], dict[str, float]]:
    """Datums (sampler logprobs, masks) whose advantages are the teacher's reverse-KL
    advantages, and ``teacher_kl``, the mean ``logp_student - logp_teacher`` over sampled tokens."""
    data_D, masks_D, prompts_D = [], [], []
    for group, builder in zip(groups_P, builders_P, strict=True):
        teacher_prompt = builder.teacher_prompt()
        for trajectory in group.trajectories_G:
            data, masks = trajectory_to_data(trajectory, 0.0)
            data_D += data
            masks_D += masks
            prompts_D += [teacher_prompt] * len(data)
    teacher_D = await asyncio.gather(
        *(teacher_logprobs_of_reply(teacher, p, d, m) for p, d, m in zip(prompts_D, data_D, masks_D, strict=True))
    )
    diff_sum, n_tokens = 0.0, 0.0
    for datum, mask, teacher_lp in zip(data_D, masks_D, teacher_D, strict=True):
        student_lp = datum.loss_fn_inputs["logprobs"].to_numpy()
        advantages = reverse_kl_advantages(student_lp, teacher_lp, mask, kl_coef)
        datum.loss_fn_inputs["advantages"] = tinker.TensorData.from_numpy(advantages)
        diff_sum += float(np.sum(mask * (student_lp - teacher_lp)))
        n_tokens += float(mask.sum())
    metrics = {"teacher_kl": diff_sum / n_tokens} if n_tokens else {}
    return data_D, masks_D, metrics


def _builders(dataset: RLDataset, index: int) -> list[PromptGroupBuilder]:
    builders = dataset.get_batch(index)
    for b in builders:
        if not isinstance(b, PromptGroupBuilder):
            raise ConfigurationError(f"dataset_builder: expected batches of PromptGroupBuilder, got {type(b).__name__}")
    return builders  # type: ignore[return-value]


async def _sample_and_score(
    dataset: RLDataset, index: int, sampler: tinker.SamplingClient, teacher: tinker.SamplingClient,
    config: Config, metrics: dict[str, float],
) -> tuple[list[tinker.Datum], list[np.ndarray], list[TrajectoryGroup], dict[str, float]]:
    builders = _builders(dataset, index)
    seed = None if config.seed is None else derive_seed(config.seed, "distill", index)  # per step, reproducible
    policy = TinkerTokenCompleter(sampler, config.max_tokens, config.temperature, seed=seed)
    with timed("sample", metrics):
        groups_P = list(await asyncio.gather(*(do_group_rollout(b, policy, index) for b in builders)))
    with timed("teacher", metrics):
        data_D, masks_D, kl_metrics = await distillation_data(groups_P, builders, teacher, config.kl_coef)
    return data_D, masks_D, groups_P, kl_metrics


async def _evaluate(
    sampler: tinker.SamplingClient, teacher: tinker.SamplingClient, test_dataset: RLDataset | None,
    config: Config,
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for evaluator in config.evaluators:
        metrics.update(await evaluator(sampler))
    if test_dataset is not None:
        _, _, _, kl_metrics = await _sample_and_score(test_dataset, 0, sampler, teacher, config, {})
        metrics.update({f"test/{k}": v for k, v in kl_metrics.items()})
    return metrics


async def main(config: Config) -> None:
    """Distil the teacher into the student for ``max_steps`` (or one pass over the dataset)."""
    run = await start_training_run(config)
    training_client, start_step, ml_logger = run.training_client, run.start_step, run.ml_logger
    dataset, test_dataset = config.dataset_builder(run.renderer)
    teacher = create_teacher(run.service, config.teacher_model or config.model_name)
    total = count_steps(len(dataset), max_steps=config.max_steps)
    has_eval = bool(config.evaluators) or test_dataset is not None
    adam = run.adam(config.learning_rate)
    for step in progress(range(start_step, total), desc="distill", total=total - start_step):
        t0 = time.perf_counter()
        sampler = training_client.save_weights_and_get_sampling_client()
        metrics: dict[str, float] = {}
        if has_eval and config.eval_every > 0 and step % config.eval_every == 0:
            metrics.update(await _evaluate(sampler, teacher, test_dataset, config))
        data_D, masks_D, groups_P, kl_metrics = await _sample_and_score(dataset, step, sampler, teacher, config, metrics)
        metrics.update(kl_metrics)
        with timed("train", metrics):
            if data_D:
                fwd_bwd = training_client.forward_backward(data_D, config.loss_fn, config.loss_fn_config)
                optim = training_client.optim_step(adam)
                result = await fwd_bwd
                await optim
                train_logprobs = [out["logprobs"].to_numpy() for out in result.loss_fn_outputs]
                metrics.update(compute_kl_sample_train(data_D, masks_D, train_logprobs))
        await run.maybe_save(step + 1, total)
        rollout_metrics = compute_trajectory_metrics(groups_P)  # rewards are all 0: keep the env metrics
        metrics.update({k: v for k, v in rollout_metrics.items() if k.startswith("env/all/") and k != "env/all/reward"})
        metrics["rollout/errors"] = rollout_metrics["rollout/errors"]
        metrics["time/step"] = time.perf_counter() - t0
        ml_logger.log_metrics(metrics, step=step)
    if total > start_step and has_eval:
        final_sampler = training_client.save_weights_and_get_sampling_client()
        ml_logger.log_metrics(await _evaluate(final_sampler, teacher, test_dataset, config), step=total)
    await run.finish(total)

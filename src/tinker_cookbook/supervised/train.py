"""The supervised fine-tuning loop: pipelined ``forward_backward`` + ``optim_step`` per batch.

Each step submits its forward/backward and optimizer step at once and only then waits for
the step ``submit_ahead`` batches earlier, so the backend always has the next batch queued
(calls on one training client run in submission order, so this is safe). Metrics per step:
``train_mean_nll`` (weighted mean NLL of the batch, before the update), ``learning_rate``,
``num_tokens``, ``epoch`` and timings. Evaluators (``test/nll`` when the dataset builder
returns a test set) run before steps ``0, eval_every, 2 * eval_every, ...`` (on the same
weights as that step's ``train_mean_nll``) and after the last step (logged at
``step = total_steps``). Checkpoints go to ``checkpoints.jsonl`` every ``save_every`` steps and
at the end; a rerun with the same ``log_path`` resumes from the last one.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import tinker
from tinker_cookbook import checkpoint_utils
from tinker_cookbook.eval.evaluators import NLLEvaluator, TrainingClientEvaluator, compute_mean_nll
from tinker_cookbook.renderers import get_recommended_renderer_name, get_renderer
from tinker_cookbook.supervised.data import SupervisedDataset, SupervisedDatasetBuilder
from tinker_cookbook.utils.lr_scheduling import LRSchedule, lr_multiplier
from tinker_cookbook.utils.misc import progress
from tinker_cookbook.utils.ml_log import MetricsLogger

logger = logging.getLogger(__name__)


@dataclass
class Config:
    log_path: str
    model_name: str
    dataset_builder: SupervisedDatasetBuilder
    renderer_name: str | None = None  # None: the model's recommended renderer
    learning_rate: float = 1e-4
    lr_schedule: LRSchedule = "linear"
    num_epochs: int = 1
    max_steps: int | None = None  # stop early after this many steps in total
    lora_rank: int = 32
    base_url: str | None = None
    load_checkpoint_path: str | None = None  # start from these weights (a fresh run only)
    eval_every: int = 10  # 0: only at the end
    save_every: int = 20  # 0: only at the end
    submit_ahead: int = 1  # batches in flight beyond the one being waited on
    evaluators: list[TrainingClientEvaluator] = field(default_factory=list)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    wandb_project: str | None = None
    seed: int | None = None  # LoRA initialisation; None: random


@dataclass
class _Submitted:
    step: int
    data: list[tinker.Datum]
    fwd_bwd: tinker.APIFuture[tinker.ForwardBackwardOutput]
    optim: tinker.APIFuture[tinker.OptimStepResponse]
    metrics: dict[str, Any]


async def main(config: Config) -> None:
    """Train until the dataset's epochs or ``max_steps`` run out, logging to ``config.log_path``."""
    service = tinker.ServiceClient(base_url=config.base_url)
    training_client, start_step = checkpoint_utils.create_training_client(
        service, config.log_path, config.model_name, config.lora_rank, config.load_checkpoint_path, config.seed
    )
    await training_client
    ml_logger = MetricsLogger(config.log_path, config, resume_step=start_step, wandb_project=config.wandb_project)
    renderer = get_renderer(
        config.renderer_name or get_recommended_renderer_name(config.model_name), training_client.get_tokenizer()
    )
    train_data, test_data = config.dataset_builder(renderer)
    evaluators = list(config.evaluators)
    if test_data is not None:
        evaluators.append(NLLEvaluator([d for i in range(len(test_data)) for d in test_data.get_batch(i)]))
    total_steps = len(train_data) * config.num_epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    if start_step:
        logger.info("resuming at step %d of %d", start_step, total_steps)

    pending: deque[_Submitted] = deque()
    last_done = time.perf_counter()

    async def finish_oldest() -> None:
        nonlocal last_done
        submitted = pending.popleft()
        metrics = await _finish(submitted)
        metrics["time/step"], last_done = time.perf_counter() - last_done, time.perf_counter()
        ml_logger.log_metrics(metrics, step=submitted.step)

    async def evaluate() -> dict[str, float]:
        metrics: dict[str, float] = {}
        for evaluator in evaluators:  # ordered after every step submitted so far
            metrics.update(await evaluator(training_client))
        return metrics

    for step in progress(range(start_step, total_steps), desc="sft", total=total_steps - start_step):
        eval_metrics = {}
        if evaluators and config.eval_every > 0 and step % config.eval_every == 0:
            while pending:  # log the earlier steps first
                await finish_oldest()
            eval_metrics = await evaluate()  # the weights before this step, like train_mean_nll
            last_done = time.perf_counter()  # time/step leaves the evaluation out
        pending.append(_submit(training_client, train_data, step, total_steps, config))
        pending[-1].metrics.update(eval_metrics)
        while len(pending) > config.submit_ahead:
            await finish_oldest()
        if config.save_every > 0 and (step + 1) % config.save_every == 0 and step + 1 < total_steps:
            await checkpoint_utils.save_checkpoint(training_client, f"{step + 1:06d}", config.log_path, step + 1)
    while pending:
        await finish_oldest()
    if total_steps > start_step:
        if evaluators:
            ml_logger.log_metrics(await evaluate(), step=total_steps)
        await checkpoint_utils.save_checkpoint(
            training_client, "final", config.log_path, total_steps, kind="both", final=True
        )
    ml_logger.close()


def _submit(
    training_client: tinker.TrainingClient, dataset: SupervisedDataset, step: int, total_steps: int, config: Config
) -> _Submitted:
    """Submit the step's forward_backward and optim_step without waiting for either."""
    epoch, index = divmod(step, len(dataset))
    if index == 0:
        dataset.set_epoch(epoch)
    data = dataset.get_batch(index)
    lr = config.learning_rate * lr_multiplier(config.lr_schedule, step, total_steps)
    adam = tinker.AdamParams(learning_rate=lr, beta1=config.adam_beta1, beta2=config.adam_beta2, eps=config.adam_eps)
    metrics = {
        "epoch": epoch,
        "learning_rate": lr,
        "num_sequences": len(data),
        "num_tokens": sum(d.model_input.length for d in data),
        "progress": (step + 1) / total_steps,
    }
    fwd_bwd = training_client.forward_backward(data, "cross_entropy")
    optim = training_client.optim_step(adam)
    return _Submitted(step, data, fwd_bwd, optim, metrics)


async def _finish(submitted: _Submitted) -> dict[str, Any]:
    """Wait for a submitted step; its metrics, with ``train_mean_nll`` of the batch before the update."""
    output = await submitted.fwd_bwd
    await submitted.optim
    metrics = dict(submitted.metrics)
    metrics["train_mean_nll"] = compute_mean_nll(output.loss_fn_outputs, submitted.data)
    return metrics

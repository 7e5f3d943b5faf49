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
from tinker_cookbook.eval.evaluators import NLLEvaluator, TrainingClientEvaluator, compute_mean_nll
from tinker_cookbook.supervised.data import SupervisedDataset, SupervisedDatasetBuilder
from tinker_cookbook.training_run import TrainingRun, count_steps, start_training_run
from tinker_cookbook.utils.lr_scheduling import LRSchedule, lr_multiplier
from tinker_cookbook.utils.misc import progress

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
    run = await start_training_run(config)
    training_client, start_step, ml_logger = run.training_client, run.start_step, run.ml_logger
    train_data, test_data = config.dataset_builder(run.renderer)
    evaluators = list(config.evaluators)
    if test_data is not None:
        evaluators.append(NLLEvaluator([d for i in range(len(test_data)) for d in test_data.get_batch(i)]))
    total_steps = count_steps(len(train_data), config.num_epochs, config.max_steps)
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
        pending.append(_submit(run, train_data, step, total_steps))
        pending[-1].metrics.update(eval_metrics)
        while len(pending) > config.submit_ahead:
            await finish_oldest()
        await run.maybe_save(step + 1, total_steps)
    while pending:
        await finish_oldest()
    if total_steps > start_step and evaluators:
        ml_logger.log_metrics(await evaluate(), step=total_steps)
    await run.finish(total_steps)


def _submit(run: TrainingRun[Config], dataset: SupervisedDataset, step: int, total_steps: int) -> _Submitted:
    """Submit the step's forward_backward and optim_step without waiting for either."""
    config = run.config
    epoch, index = divmod(step, len(dataset))
    if index == 0:
        dataset.set_epoch(epoch)
    data = dataset.get_batch(index)
    lr = config.learning_rate * lr_multiplier(config.lr_schedule, step, total_steps)
    metrics = {
        "epoch": epoch,
        "learning_rate": lr,
        "num_sequences": len(data),
        "num_tokens": sum(d.model_input.length for d in data),
        "progress": (step + 1) / total_steps,
    }
    fwd_bwd = run.training_client.forward_backward(data, "cross_entropy")
    optim = run.training_client.optim_step(run.adam(lr))
    return _Submitted(step, data, fwd_bwd, optim, metrics)


async def _finish(submitted: _Submitted) -> dict[str, Any]:
    """Wait for a submitted step; its metrics, with ``train_mean_nll`` of the batch before the update."""
    output = await submitted.fwd_bwd
    await submitted.optim
    metrics = dict(submitted.metrics)
    metrics["train_mean_nll"] = compute_mean_nll(output.loss_fn_outputs, submitted.data)
    return metrics

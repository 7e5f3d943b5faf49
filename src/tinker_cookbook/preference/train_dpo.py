"""Direct Preference Optimization (DPO) through ``forward_backward_custom``.

For each labeled comparison the chosen and the rejected completion are rendered after the
prompt (weights mark the completion's assistant tokens only), and their summed logprobs under
the policy (``pi``) and a frozen reference (``ref``, the run's initial weights) give::

    reward = beta * (pi - ref)          # per completion
    loss   = -log sigmoid(reward_chosen - reward_rejected)   # averaged over pairs

Metrics per step (on the batch, before the update): ``dpo_loss``, ``accuracy`` (share of pairs
with ``reward_chosen > reward_rejected``), ``margin`` (mean ``reward_chosen - reward_rejected``),
``chosen_reward``, ``rejected_reward``, plus ``test/...`` the same on the test set every
``eval_every`` steps and at the end. At step 0 the policy is the reference, so ``dpo_loss`` is
log(2) and the margins are only float noise between the sampler and the trainer (so is
``accuracy`` there).

Pipelining: the reference logprobs do not depend on training, so the next batch's are requested
while the current step trains (and cached, so later epochs reuse them). A step's
``forward_backward_custom`` (forward, the loss on the client, then the surrogate backward) and
``optim_step`` are submitted together; the backend runs a run's calls in submission order, so
up to ``submit_ahead`` later steps can be queued behind them and see the updated weights.

The reference is a sampler snapshot of the initial weights, recorded as ``"reference"`` in
``checkpoints.jsonl`` so a resumed run scores against the same weights.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

import tinker
from tinker.training_client import CustomLossFn
from tinker_cookbook import checkpoint_utils
from tinker_cookbook.preference.datasets import ComparisonDatasetBuilder
from tinker_cookbook.preference.types import LabeledComparison
from tinker_cookbook.renderers import Message, Renderer, TrainOnWhat
from tinker_cookbook.supervised.data import conversation_to_datum
from tinker_cookbook.training_run import TrainingRun, count_steps, start_training_run
from tinker_cookbook.utils.lr_scheduling import LRSchedule, lr_multiplier
from tinker_cookbook.utils.misc import progress

logger = logging.getLogger(__name__)

DPO_METRICS = ("dpo_loss", "accuracy", "margin", "chosen_reward", "rejected_reward")
REFERENCE_NAME = "reference"


@dataclass
class Config:
    log_path: str
    model_name: str
    dataset_builder: ComparisonDatasetBuilder
    renderer_name: str | None = None  # None: the model's recommended renderer
    beta: float = 0.1
    learning_rate: float = 1e-5
    lr_schedule: LRSchedule = "linear"
    num_epochs: int = 1
    max_steps: int | None = None  # stop early after this many steps in total
    max_length: int | None = None  # cut rendered sequences to this many tokens
    lora_rank: int = 32
    base_url: str | None = None
    load_checkpoint_path: str | None = None  # start (and take the reference) from these weights
    eval_every: int = 10  # 0: only at the end
    save_every: int = 20  # 0: only at the end
    submit_ahead: int = 1  # steps in flight beyond the one being waited on
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    wandb_project: str | None = None
    seed: int | None = None  # LoRA initialisation; None: random


# --- data ----------------------------------------------------------------------------------------


def comparison_to_datums(
    comparison: LabeledComparison, renderer: Renderer, max_length: int | None = None
) -> tuple[tinker.Datum, tinker.Datum]:
    """The chosen and the rejected datum; only the completion's assistant tokens have weight 1."""
    prompt: list[Message] = [{**m, "trainable": False} for m in comparison.comparison.prompt_conversation]

    def datum(completion: list[Message]) -> tinker.Datum:
        marked: list[Message] = [{**m, "trainable": m["role"] == "assistant"} for m in completion]
        return conversation_to_datum(prompt + marked, renderer, max_length, TrainOnWhat.CUSTOMIZED)

    return datum(comparison.chosen), datum(comparison.rejected)


def full_tokens(datum: tinker.Datum) -> list[int]:
    """The whole sequence of a shifted datum: its input plus the last target."""
    return datum.model_input.to_ints() + datum.loss_fn_inputs["target_tokens"].tolist()[-1:]


async def reference_logprobs(
    reference: tinker.SamplingClient, data_D: list[tinker.Datum], cache: dict[tuple[int, ...], list[float]]
) -> list[float]:
    """Weighted sum of the reference's target logprobs per datum (``cache`` keeps per-token ones)."""
    keys = [tuple(full_tokens(d)) for d in data_D]
    missing = list(dict.fromkeys(k for k in keys if k not in cache))
    results = await asyncio.gather(*(reference.compute_logprobs(tinker.ModelInput.from_ints(list(k))) for k in missing))
    for key, lps in zip(missing, results, strict=True):
        cache[key] = [0.0 if x is None else float(x) for x in lps[1:]]  # logprob of each target
    return [
        float(sum(w * lp for w, lp in zip(d.loss_fn_inputs["weights"].tolist(), cache[k], strict=True)))
        for d, k in zip(data_D, keys, strict=True)
    ]


# --- the loss ------------------------------------------------------------------------------------


def dpo_loss_and_metrics(
    policy_chosen_P: torch.Tensor,
    policy_rejected_P: torch.Tensor,
    ref_chosen_P: torch.Tensor,
    ref_rejected_P: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The DPO loss (mean over pairs) from summed completion logprobs, and its metrics."""
    chosen_reward_P = beta * (policy_chosen_P - ref_chosen_P)
    rejected_reward_P = beta * (policy_rejected_P - ref_rejected_P)
    margin_P = chosen_reward_P - rejected_reward_P
    loss = -torch.nn.functional.logsigmoid(margin_P).mean()
    metrics = {
        "dpo_loss": float(loss.detach()),
        "accuracy": float((margin_P > 0).float().mean()),
        "margin": float(margin_P.detach().mean()),
        "chosen_reward": float(chosen_reward_P.detach().mean()),
        "rejected_reward": float(rejected_reward_P.detach().mean()),
    }
    return loss, metrics


def weighted_sums(data_D: list[tinker.Datum], logprobs_D: list[torch.Tensor]) -> torch.Tensor:
    """Per datum, the sum of its target logprobs times its weights."""
    return torch.stack([
        (lp * d.loss_fn_inputs["weights"].to_torch().to(lp.dtype)).sum()
        for d, lp in zip(data_D, logprobs_D, strict=True)
    ])


def make_dpo_loss_fn(ref_D: list[float], beta: float) -> CustomLossFn:
    """A ``forward_backward_custom`` loss for data laid out ``[chosen_0, rejected_0, chosen_1, ...]``."""

    def loss_fn(data_D: list[tinker.Datum], logprobs_D: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        policy_D = weighted_sums(data_D, logprobs_D)
        ref = torch.tensor(ref_D, dtype=policy_D.dtype)
        return dpo_loss_and_metrics(policy_D[0::2], policy_D[1::2], ref[0::2], ref[1::2], beta)

    return loss_fn


# --- the loop ------------------------------------------------------------------------------------


@dataclass
class _Batch:
    data_D: list[tinker.Datum]  # chosen, rejected, chosen, ...
    ref_D: list[float]


@dataclass
class _Submitted:
    step: int
    fwd_bwd: tinker.APIFuture[tinker.ForwardBackwardOutput]
    optim: tinker.APIFuture[tinker.OptimStepResponse]
    metrics: dict[str, Any]


class _Scorer:
    """Renders comparisons and fetches their reference logprobs (cached across epochs)."""

    def __init__(self, renderer: Renderer, reference: tinker.SamplingClient, max_length: int | None) -> None:
        self.renderer = renderer
        self.reference = reference
        self.max_length = max_length
        self.cache: dict[tuple[int, ...], list[float]] = {}

    def start(self, comparisons: list[LabeledComparison]) -> asyncio.Task[_Batch]:
        """Render now; the reference logprobs arrive in the returned task."""
        data_D = [d for c in comparisons for d in comparison_to_datums(c, self.renderer, self.max_length)]

        async def score() -> _Batch:
            return _Batch(data_D, await reference_logprobs(self.reference, data_D, self.cache))

        return asyncio.ensure_future(score())


async def get_reference_client(
    training_client: tinker.TrainingClient, log_path: str
) -> tinker.SamplingClient:
    """The run's frozen reference: the ``"reference"`` sampler checkpoint, saved now if absent."""
    records = [r for r in checkpoint_utils.load_checkpoints(log_path) if r.get("name") == REFERENCE_NAME]
    if records:
        path = records[-1]["sampler_path"]
    else:  # a fresh run: these are the initial weights
        path = (await checkpoint_utils.save_checkpoint(training_client, REFERENCE_NAME, log_path, 0, "sampler"))[
            "sampler_path"
        ]
    return training_client.create_sampling_client(path)


async def evaluate_dpo(
    training_client: tinker.TrainingClient, scorer: _Scorer, comparisons: list[LabeledComparison], beta: float
) -> dict[str, float]:
    """DPO metrics of the current weights on ``comparisons`` (``test/`` prefix), no update."""
    batch = await scorer.start(comparisons)
    output = await training_client.forward(batch.data_D, "cross_entropy")
    logprobs_D = [out["logprobs"].to_torch() for out in output.loss_fn_outputs]
    policy_D = weighted_sums(batch.data_D, logprobs_D)
    ref = torch.tensor(batch.ref_D, dtype=policy_D.dtype)
    _, metrics = dpo_loss_and_metrics(policy_D[0::2], policy_D[1::2], ref[0::2], ref[1::2], beta)
    return {f"test/{k}": v for k, v in metrics.items()}


async def main(config: Config) -> None:
    """Train until the dataset's epochs or ``max_steps`` run out, logging to ``config.log_path``."""
    run = await start_training_run(config)
    training_client, start_step, ml_logger = run.training_client, run.start_step, run.ml_logger
    train_data, test_data = config.dataset_builder()
    scorer = _Scorer(run.renderer, await get_reference_client(training_client, config.log_path), config.max_length)
    test_comparisons = test_data.get_batch(0) if test_data is not None else []
    total_steps = count_steps(len(train_data), config.num_epochs, config.max_steps)
    if start_step:
        logger.info("resuming at step %d of %d", start_step, total_steps)

    def start_batch(step: int) -> asyncio.Task[_Batch]:
        epoch, index = divmod(step, len(train_data))
        if index == 0:
            train_data.set_epoch(epoch)
        return scorer.start(train_data.get_batch(index))

    pending: deque[_Submitted] = deque()
    last_done = time.perf_counter()

    async def finish_oldest() -> None:
        nonlocal last_done
        submitted = pending.popleft()
        metrics = await _finish(submitted)
        metrics["time/step"], last_done = time.perf_counter() - last_done, time.perf_counter()
        ml_logger.log_metrics(metrics, step=submitted.step)

    next_batch = start_batch(start_step) if start_step < total_steps else None
    for step in progress(range(start_step, total_steps), desc="dpo", total=total_steps - start_step):
        eval_metrics = {}
        if test_comparisons and config.eval_every > 0 and step % config.eval_every == 0:
            while pending:  # log the earlier steps first
                await finish_oldest()
            eval_metrics = await evaluate_dpo(training_client, scorer, test_comparisons, config.beta)
            last_done = time.perf_counter()  # time/step leaves the evaluation out
        assert next_batch is not None
        wait_start = time.perf_counter()
        batch = await next_batch
        ref_wait = time.perf_counter() - wait_start
        next_batch = start_batch(step + 1) if step + 1 < total_steps else None  # overlaps this step
        pending.append(_submit(run, batch, step, step // len(train_data), total_steps))
        pending[-1].metrics.update(eval_metrics, **{"time/ref_wait": ref_wait})
        while len(pending) > config.submit_ahead:
            await finish_oldest()
        await run.maybe_save(step + 1, total_steps)
    while pending:
        await finish_oldest()
    if total_steps > start_step and test_comparisons:
        ml_logger.log_metrics(await evaluate_dpo(training_client, scorer, test_comparisons, config.beta), step=total_steps)
    await run.finish(total_steps)


def _submit(run: TrainingRun[Config], batch: _Batch, step: int, epoch: int, total_steps: int) -> _Submitted:
    """Submit the step's forward_backward_custom and optim_step without waiting for either."""
    config = run.config
    lr = config.learning_rate * lr_multiplier(config.lr_schedule, step, total_steps)
    metrics = {
        "epoch": epoch,
        "learning_rate": lr,
        "num_pairs": len(batch.data_D) // 2,
        "num_tokens": sum(d.model_input.length for d in batch.data_D),
        "progress": (step + 1) / total_steps,
    }
    fwd_bwd = run.training_client.forward_backward_custom(batch.data_D, make_dpo_loss_fn(batch.ref_D, config.beta))
    optim = run.training_client.optim_step(run.adam(lr))
    return _Submitted(step, fwd_bwd, optim, metrics)


async def _finish(submitted: _Submitted) -> dict[str, Any]:
    """Wait for a submitted step; its metrics, with the DPO ones of the batch before the update."""
    output = await submitted.fwd_bwd
    await submitted.optim
    return {**submitted.metrics, **{k: output.metrics[k] for k in DPO_METRICS}}

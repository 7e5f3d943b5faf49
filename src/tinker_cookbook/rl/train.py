"""The RL training loop: sample groups, compute GRPO advantages, train with a policy-gradient loss.

Three modes, same data path (rollouts -> advantages -> datums -> ``forward_backward`` +
``optim_step``):

* **sync** (default): each step snapshots the weights into a sampler, samples the whole batch,
  then trains on it. Strictly on-policy.
* **stream minibatch** (``stream_minibatch=StreamMinibatchConfig(num_minibatches=k)``): still
  on-policy, but the batch's groups are split into ``k`` minibatches and each is sent to
  ``forward_backward`` as soon as its groups finish sampling, so training overlaps the
  slowest rollouts; one ``optim_step`` per step.
* **async off-policy** (``async_config=AsyncConfig(max_steps_off_policy=n)``): rollout workers
  sample continuously from the latest sampler while the learner trains; a group sampled by
  the policy of step ``k`` is used at step ``s`` only if ``s - k <= n`` (older ones are
  dropped and counted in ``async/dropped_stale``). The importance-sampling losses correct
  for the policy lag with the sampler's logprobs.

Per-step metrics include ``reward/total``, ``env/all/<metric>``, ``optim/kl_sample_train_v1``
/ ``_v2`` (sampler vs trainer logprobs of the sampled tokens), ``kl_policy_base`` with a KL
penalty, and ``time/sample``, ``time/train``, ``time/step``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import tinker
from tinker_cookbook.completers import TinkerTokenCompleter, derive_seed
from tinker_cookbook.eval.evaluators import SamplingClientEvaluator
from tinker_cookbook.exceptions import ConfigurationError
from tinker_cookbook.rl.data_processing import (
    assemble_training_data,
    compute_advantages,
    remove_constant_reward_groups,
)
from tinker_cookbook.rl.evaluators import RLTestSetEvaluator
from tinker_cookbook.rl.metrics import (
    compute_kl_sample_train,
    compute_trajectory_metrics,
    incorporate_kl_penalty,
)
from tinker_cookbook.rl.rollouts import do_group_rollout
from tinker_cookbook.rl.types import EnvGroupBuilder, RLDataset, RLDatasetBuilder, TrajectoryGroup
from tinker_cookbook.training_run import TrainingRun, count_steps, start_training_run
from tinker_cookbook.utils.misc import progress

logger = logging.getLogger(__name__)


@dataclass
class StreamMinibatchConfig:
    num_minibatches: int = 2
    """forward_backward calls per step, each sent as soon as its share of groups is sampled."""


@dataclass
class AsyncConfig:
    max_steps_off_policy: int = 1
    """Train on groups sampled by a policy at most this many optimizer steps old."""


@dataclass
class Config:
    log_path: str
    model_name: str
    dataset_builder: RLDatasetBuilder
    learning_rate: float = 4e-5
    max_tokens: int = 64
    temperature: float = 1.0
    lora_rank: int = 32
    renderer_name: str | None = None  # None: the model's recommended renderer
    loss_fn: str = "importance_sampling"
    loss_fn_config: dict[str, float] | None = None
    num_substeps: int = 1  # optimizer steps per batch (the batch is split into this many parts)
    kl_penalty_coef: float = 0.0
    kl_reference_model: str | None = None  # None: the base model
    remove_constant_reward_groups: bool = False
    max_steps: int | None = None  # None: one pass over the dataset
    eval_every: int = 10  # 0: only at the end
    save_every: int = 20  # 0: only at the end
    base_url: str | None = None
    load_checkpoint_path: str | None = None
    evaluators: list[SamplingClientEvaluator] = field(default_factory=list)
    stream_minibatch: StreamMinibatchConfig | None = None
    async_config: AsyncConfig | None = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    wandb_project: str | None = None
    seed: int | None = None
    """LoRA initialisation and sampling: each group of each step samples with its own seed
    derived from this one, so a sync-mode run is reproducible. None: random."""


class _Trainer:
    """What every mode shares: the clients, the dataset and the per-step bookkeeping."""

    def __init__(self, run: TrainingRun[Config], dataset: RLDataset, evaluators: list[SamplingClientEvaluator],
                 reference: tinker.SamplingClient | None) -> None:
        self.run = run
        self.config = run.config
        self.training_client = run.training_client
        self.dataset = dataset
        self.evaluators = evaluators
        self.reference = reference

    def policy(self, sampler: tinker.SamplingClient, step: int, group: int) -> TinkerTokenCompleter:
        """The sampling policy of one group of one step (its own seed when the run has one)."""
        seed = None if self.config.seed is None else derive_seed(self.config.seed, "rl", step, group)
        return TinkerTokenCompleter(sampler, self.config.max_tokens, self.config.temperature, seed)

    def adam(self) -> tinker.AdamParams:
        return self.run.adam(self.config.learning_rate)

    def new_sampler(self) -> tinker.SamplingClient:
        """The current weights as a sampler; it records its samples when the loss needs them."""
        return self.training_client.save_weights_and_get_sampling_client(
            record_stability_info=self.config.loss_fn == "stable_reinforce"
        )

    async def prepare(self, groups_P: list[TrajectoryGroup]) -> tuple[list[tinker.Datum], list[np.ndarray], dict[str, float]]:
        """Advantages, datums and (with a KL penalty) the penalised advantages of some groups."""
        if self.config.remove_constant_reward_groups:
            groups_P = remove_constant_reward_groups(groups_P)
        data_D, masks_D = assemble_training_data(groups_P, compute_advantages(groups_P))
        metrics: dict[str, float] = {}
        if data_D and self.reference is not None and self.config.kl_penalty_coef:
            metrics.update(await incorporate_kl_penalty(data_D, masks_D, self.reference, self.config.kl_penalty_coef))
        return data_D, masks_D, metrics

    def submit_forward_backward(self, data_D: list[tinker.Datum]) -> tinker.APIFuture[tinker.ForwardBackwardOutput]:
        return self.training_client.forward_backward(data_D, self.config.loss_fn, self.config.loss_fn_config)

    async def train(self, data_D: list[tinker.Datum], masks_D: list[np.ndarray]) -> dict[str, float]:
        """``num_substeps`` pipelined (forward_backward, optim_step) pairs over the datums."""
        if not data_D:
            return {"optim/skipped": 1.0}
        n = min(self.config.num_substeps, len(data_D))
        parts = [list(range(len(data_D)))[i::n] for i in range(n)]
        submitted = []
        for part in parts:  # submit every pair before awaiting any
            submitted.append((part, self.submit_forward_backward([data_D[i] for i in part]), self.training_client.optim_step(self.adam())))
        outputs: list[Any] = [None] * len(data_D)
        for part, fwd_bwd, optim in submitted:
            result = await fwd_bwd
            await optim
            for i, out in zip(part, result.loss_fn_outputs, strict=True):
                outputs[i] = out["logprobs"].to_numpy()
        return compute_kl_sample_train(data_D, masks_D, outputs)

    async def evaluate(self, sampler: tinker.SamplingClient) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for evaluator in self.evaluators:
            metrics.update(await evaluator(sampler))
        return metrics

    def eval_due(self, step: int, total: int) -> bool:
        """Evaluate before steps 0, eval_every, ... (the final evaluation is separate)."""
        every = self.config.eval_every
        return bool(self.evaluators) and every > 0 and step % every == 0 and step < total

    def log(self, step: int, groups_P: list[TrajectoryGroup], metrics: dict[str, float]) -> None:
        self.run.ml_logger.log_metrics({**compute_trajectory_metrics(groups_P), **metrics}, step=step)


async def main(config: Config) -> None:
    """Train for ``max_steps`` (or one pass over the dataset), logging to ``config.log_path``."""
    if config.stream_minibatch is not None and config.async_config is not None:
        raise ConfigurationError("stream_minibatch, async_config: pick one mode, got both")
    run = await start_training_run(config)
    dataset, test_dataset = config.dataset_builder(run.renderer)
    evaluators = list(config.evaluators)
    if test_dataset is not None:
        evaluators.append(RLTestSetEvaluator(test_dataset, config.max_tokens, seed=config.seed))
    total = count_steps(len(dataset), max_steps=config.max_steps)
    reference = None
    if config.kl_penalty_coef:
        reference = run.service.create_sampling_client(base_model=config.kl_reference_model or config.model_name)
    trainer = _Trainer(run, dataset, evaluators, reference)
    if config.async_config is not None:
        await _run_async(trainer, run.start_step, total, config.async_config)
    else:
        await _run_on_policy(trainer, run.start_step, total)
    if total > run.start_step:
        final_sampler = run.training_client.save_weights_and_get_sampling_client()
        if evaluators:
            run.ml_logger.log_metrics(await trainer.evaluate(final_sampler), step=total)
    await run.finish(total)


async def _run_on_policy(trainer: _Trainer, start_step: int, total: int) -> None:
    """Sync and stream-minibatch modes."""
    stream = trainer.config.stream_minibatch
    for step in progress(range(start_step, total), desc="rl", total=total - start_step):
        t0 = time.perf_counter()
        sampler = trainer.new_sampler()
        metrics: dict[str, float] = {}
        if trainer.eval_due(step, total):
            metrics.update(await trainer.evaluate(sampler))
        t_sample = time.perf_counter()
        builders = trainer.dataset.get_batch(step)
        if stream is None:
            groups_P = await asyncio.gather(
                *(do_group_rollout(b, trainer.policy(sampler, step, i), step) for i, b in enumerate(builders))
            )
            metrics["time/sample"] = time.perf_counter() - t_sample
            t_train = time.perf_counter()
            data_D, masks_D, prep_metrics = await trainer.prepare(groups_P)
            metrics.update(prep_metrics)
            metrics.update(await trainer.train(data_D, masks_D))
            metrics["time/train"] = time.perf_counter() - t_train
        else:
            groups_P = await _stream_step(trainer, builders, sampler, step, stream.num_minibatches, metrics)
        await trainer.run.maybe_save(step + 1, total)
        metrics["time/step"] = time.perf_counter() - t0
        trainer.log(step, list(groups_P), metrics)


async def _stream_step(trainer: _Trainer, builders: list[EnvGroupBuilder], sampler: tinker.SamplingClient,
                       step: int, num_minibatches: int, metrics: dict[str, float]) -> list[TrajectoryGroup]:
    """Send each minibatch's forward_backward as soon as its groups are sampled; one optim_step."""
    t_sample = time.perf_counter()
    tasks = [asyncio.ensure_future(do_group_rollout(b, trainer.policy(sampler, step, i), step)) for i, b in enumerate(builders)]
    per_minibatch = -(-len(tasks) // num_minibatches)
    done_P: list[TrajectoryGroup] = []
    waiting: list[TrajectoryGroup] = []
    submitted = []
    for next_done in asyncio.as_completed(tasks):
        group = await next_done
        done_P.append(group)
        waiting.append(group)
        if len(waiting) == per_minibatch or len(done_P) == len(tasks):
            data_D, masks_D, prep_metrics = await trainer.prepare(waiting)
            metrics.update(prep_metrics)
            if data_D:
                submitted.append((data_D, masks_D, trainer.submit_forward_backward(data_D)))
            waiting = []
    metrics["time/sample"] = time.perf_counter() - t_sample
    t_train = time.perf_counter()
    optim = trainer.training_client.optim_step(trainer.adam()) if submitted else None
    all_data, all_masks, all_logprobs = [], [], []
    for data_D, masks_D, fwd_bwd in submitted:
        result = await fwd_bwd
        all_data += data_D
        all_masks += masks_D
        all_logprobs += [out["logprobs"].to_numpy() for out in result.loss_fn_outputs]
    if optim is not None:
        await optim
    metrics.update(compute_kl_sample_train(all_data, all_masks, all_logprobs))
    metrics["time/train_after_sampling"] = time.perf_counter() - t_train
    return done_P


@dataclass
class _LatestPolicy:
    step: int
    """The version of the latest sampler: the number of optimizer steps it has seen."""
    sampler: tinker.SamplingClient
    groups_started: int = 0


async def _run_async(trainer: _Trainer, start_step: int, total: int, async_config: AsyncConfig) -> None:
    """Rollout workers sample from the latest sampler; the learner trains on finished groups."""
    groups_per_batch = len(trainer.dataset.get_batch(start_step))
    max_lag = async_config.max_steps_off_policy
    state = _LatestPolicy(start_step, trainer.new_sampler())
    changed = asyncio.Condition()
    finished: asyncio.Queue[TrajectoryGroup | Exception] = asyncio.Queue()

    async def worker() -> None:
        while True:
            n = state.groups_started
            state.groups_started += 1
            batch = start_step + n // groups_per_batch

            def caught_up(batch: int = batch) -> bool:  # do not run more than max_lag steps ahead
                return state.step >= batch - max_lag

            async with changed:
                await changed.wait_for(caught_up)
            builder = trainer.dataset.get_batch(batch % len(trainer.dataset))[n % groups_per_batch]
            try:
                group = await do_group_rollout(builder, trainer.policy(state.sampler, batch, n), state.step)
            except Exception as e:  # hand it to the learner, which raises it
                await finished.put(e)
                return
            await finished.put(group)

    workers = [asyncio.ensure_future(worker()) for _ in range(groups_per_batch)]
    try:
        for step in progress(range(start_step, total), desc="rl-async", total=total - start_step):
            t0 = time.perf_counter()
            metrics: dict[str, float] = {}
            if trainer.eval_due(step, total):
                metrics.update(await trainer.evaluate(state.sampler))
            groups_P: list[TrajectoryGroup] = []
            dropped = 0
            while len(groups_P) < groups_per_batch:
                group = await finished.get()
                if isinstance(group, Exception):
                    raise group
                if step - group.sampler_step > max_lag:
                    dropped += 1
                else:
                    groups_P.append(group)
            metrics["time/wait_for_groups"] = time.perf_counter() - t0
            t_train = time.perf_counter()
            data_D, masks_D, prep_metrics = await trainer.prepare(groups_P)
            metrics.update(prep_metrics)
            metrics.update(await trainer.train(data_D, masks_D))
            new_sampler = trainer.new_sampler()
            await new_sampler
            metrics["time/train"] = time.perf_counter() - t_train
            async with changed:
                state.step, state.sampler = step + 1, new_sampler
                changed.notify_all()
            await trainer.run.maybe_save(step + 1, total)
            metrics["async/dropped_stale"] = float(dropped)
            metrics["async/mean_staleness"] = float(np.mean([step - g.sampler_step for g in groups_P]))
            metrics["time/step"] = time.perf_counter() - t0
            trainer.log(step, groups_P, metrics)
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

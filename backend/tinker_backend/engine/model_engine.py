"""``ModelEngine``: one base model loaded once, serving many LoRA adapters for training and sampling.

Synchronous torch code. Each engine is driven by ONE compute thread (the scheduler's), so it
holds no locks; the LoRA routing it sets before a forward pass is shared by all its layers.

Training adapters and sampler snapshots live in the same LoRA layers under distinct routing
keys (``train:<id>`` and ``sample:<id>``), so a sampler keeps its frozen weights while the
adapter it was taken from goes on training.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, cast

import msgspec
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

from tinker.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LoraConfig,
    SampleResponse,
    SamplingParams,
)

from .. import checkpoints
from ..checkpoints import AdapterCheckpoint
from .adapters import AdapterTable
from .host_memory import keep_freed_memory
from .lora import (
    LORA_ALPHA,
    LoraLinear,
    LoraRouting,
    attach_lora_layers,
    init_lora_weights,
)
from .lora import target_paths as lora_target_paths
from .protocol import FwdBwdItem
from .torch_sampler import SAMPLERS, Sampler, SampleRequest, StopCriteria
from .trainer import PreparedItem, TrainableAdapter, adamw_steps, forward_backward_batch, prepare_item

__all__ = ["DEFAULT_CHECKPOINT_TOKENS", "FwdBwdItem", "ModelEngine"]

# Padded tokens of a training pass from which decoder activations are recomputed in the backward
# pass rather than kept: SmolLM2 keeps 2.2-3.7 MB of them per token (docs/operations.md).
DEFAULT_CHECKPOINT_TOKENS = 2048


def _same_weight(saved: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``saved`` is ``weight``, up to the rounding of the dtype it was saved in."""
    if saved.shape != weight.shape:
        return False
    tolerance = 1e-6 if saved.dtype == torch.float32 else 1e-2
    return torch.allclose(saved.float(), weight.detach().float().cpu(), rtol=tolerance, atol=tolerance)


def _train_key(adapter_id: str) -> str:
    return f"train:{adapter_id}"


class ModelEngine:
    """One base model (fp32 on CPU, bf16 on CUDA by default) with LoRA adapters and samplers.

    Example::

        engine = ModelEngine("tiny-llama", resolve_model("tiny-llama"))
        engine.create_adapter("run1", LoraConfig(rank=8, seed=0))
        engine.forward_backward("run1", data, "cross_entropy", None, backward=True)
        engine.optim_step("run1", AdamParams(learning_rate=1e-4))
        engine.snapshot_sampler("run1", "run1-sampler-0")
        engine.sample("run1-sampler-0", prompt_tokens, 4, SamplingParams(max_tokens=32))
    """

    def __init__(
        self,
        model_name: str,
        model_path: Path,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        *,
        max_slots: int = 64,
        max_host_adapters: int = 256,
        offload_dir: Path | None = None,
        sampler: str = "torch",
        sampler_dir: Path | None = None,
        max_lora_rank: int = 256,
        checkpoint_tokens: int | None = DEFAULT_CHECKPOINT_TOKENS,
    ) -> None:
        """``max_slots`` adapters stay attached on the device; the least recently used others
        wait in host memory (up to ``max_host_adapters``) and then on disk in ``offload_dir``.

        ``sampler`` is ``"torch"`` (continuous batching on this engine's weights) or ``"vllm"``
        (vLLM's engine, which reads published adapters from files in ``sampler_dir``, a
        directory it owns and empties at start, temporary by default, and sizes its LoRA
        buffers for ``max_lora_rank``; adapters it cannot serve, those with a LoRA on
        ``lm_head``, go to the torch sampler: ``RoutedSampler``).

        A training pass of at least ``checkpoint_tokens`` padded tokens recomputes the decoder
        layers' activations in its backward pass instead of keeping them (same gradients, less
        memory, about one more forward; None: never).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {list(SAMPLERS)}, got {sampler!r}")
        keep_freed_memory()  # before the model's tensors: steps then reuse freed host memory
        self.model_name = model_name
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        transformers_logging.disable_progress_bar()  # a server logs lines, not progress bars
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        self.model.to(self.device)  # type: ignore[arg-type]  # transformers' typing of .to
        self.model.eval()  # always: no dropout, so training and sampling see the same function
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.vocab_size: int = cast(nn.Embedding, self.model.get_input_embeddings()).num_embeddings
        self.max_context_length: int = int(self.model.config.max_position_embeddings)
        self.eos_token_ids: set[int] = self._eos_token_ids()
        self.checkpoint_tokens = checkpoint_tokens
        self.routing = LoraRouting()
        self.layers: dict[str, LoraLinear] = attach_lora_layers(self.model, self.routing)
        self._adapters = AdapterTable(
            self.layers, self.device, max_slots=max_slots, max_host=max_host_adapters, offload_dir=offload_dir
        )
        self._samplers: set[str] = set()
        # Inside ``joint_optim_steps``: the AdamW updates answered but not yet applied.
        self._deferred: list[tuple[str, TrainableAdapter, AdamParams]] | None = None
        self.sampler: Sampler = self._make_sampler(sampler, model_path, sampler_dir, max_lora_rank)

    def _make_sampler(self, kind: str, model_path: Path, directory: Path | None, max_lora_rank: int) -> Sampler:
        from .batcher import SamplingBatcher

        batcher = SamplingBatcher(self.model, self.routing, self.layers)  # cheap until it has rows
        if kind == "torch":
            return batcher
        from .routed_sampler import RoutedSampler
        from .vllm_sampler import VllmSampler  # imports vllm: only when asked for

        unembed = [path for path, layer in self.layers.items() if layer.kind == "unembed"]
        targets = sorted({path.rpartition(".")[2] for path in self.layers} - {p.rpartition(".")[2] for p in unembed})
        dtype = cast(torch.dtype, self.model.dtype)
        return RoutedSampler(VllmSampler(model_path, dtype, max_lora_rank, targets, unembed, directory), batcher)

    def stats(self) -> dict[str, Any]:
        """For metrics: adapters per tier, slot events, and the torch sampler's decode counts."""
        stats: dict[str, Any] = {
            "device": str(self.device), "tiers": self._adapters.tiers(), "slot_events": dict(self._adapters.events)
        }
        if self.device.type == "cuda":
            stats["device_memory_bytes"] = torch.cuda.memory_allocated(self.device)
        batcher: Any = getattr(self.sampler, "fallback", self.sampler)  # a RoutedSampler's torch sampler
        if hasattr(batcher, "decode_steps"):
            stats["decode_steps"], stats["decoded_rows"] = batcher.decode_steps, batcher.decoded_rows
        return stats

    def close(self) -> None:
        """Stop the sampler (failing its requests in flight)."""
        self.sampler.close()

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        generation_eos = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(generation_eos, int):
            ids.add(generation_eos)
        elif generation_eos:
            ids.update(generation_eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # -- adapters ---------------------------------------------------------------------------

    def has_adapter(self, adapter_id: str) -> bool:
        return adapter_id in self._adapters

    def create_adapter(self, adapter_id: str, config: LoraConfig) -> LoraConfig:
        """Create a fresh adapter (B = 0, so it starts as the base model); returns the config
        with its seed filled in (a random one when ``config.seed`` is None)."""
        if adapter_id in self._adapters:
            raise ValueError(f"adapter_id: {adapter_id!r} already exists")
        seed = config.seed if config.seed is not None else secrets.randbelow(2**31)
        config = msgspec.structs.replace(config, seed=seed)
        weights = init_lora_weights(self.layers, config, seed)
        adapter = TrainableAdapter(
            _train_key(adapter_id), config, weights, LORA_ALPHA / config.rank, self.device
        )
        self._install(adapter_id, adapter)
        return config

    def _install(self, adapter_id: str, adapter: TrainableAdapter) -> None:
        """Put ``adapter`` in a slot under ``adapter_id``, replacing any previous one."""
        self._apply_deferred()
        self._adapters.add(adapter_id, adapter)

    def remove_adapter(self, adapter_id: str) -> None:
        """Drop an adapter with its optimizer state; its sampler snapshots stay."""
        if adapter_id not in self._adapters:
            raise KeyError(f"adapter_id: no adapter {adapter_id!r} on {self.model_name}")
        self._apply_deferred()
        self._adapters.remove(adapter_id)

    def _adapter(self, adapter_id: str) -> TrainableAdapter:
        if adapter_id not in self._adapters:
            raise KeyError(f"adapter_id: no adapter {adapter_id!r} on {self.model_name}")
        self._apply_deferred()  # whoever reads or moves an adapter sees its updates applied
        return self._adapters.get(adapter_id)

    # -- training ---------------------------------------------------------------------------

    def forward_backward(
        self,
        adapter_id: str,
        data: list[Datum],
        loss_fn: str,
        loss_fn_config: dict[str, float] | None,
        backward: bool,
    ) -> ForwardBackwardOutput:
        """Loss and target logprobs of ``data``; with ``backward``, add the gradients to the
        adapter's accumulated ones (they are applied and cleared by ``optim_step``)."""
        [result] = self.forward_backward_many(
            [FwdBwdItem(adapter_id, data, loss_fn, loss_fn_config, backward)]
        )
        if isinstance(result, Exception):
            raise result
        return result

    def forward_backward_many(self, items: list[FwdBwdItem]) -> list[ForwardBackwardOutput | Exception]:
        """Run the requests of several adapters in ONE batched forward (and backward) pass.

        The result of each item equals running it alone; an invalid item gets its exception
        in its place and does not affect the others.
        """
        self._apply_deferred()
        results: list[ForwardBackwardOutput | Exception | None] = [None] * len(items)
        known = [item.adapter_id for item in items if item.adapter_id in self._adapters]
        self._adapters.acquire(known)  # every adapter of this pass in a slot at once
        prepared: list[PreparedItem] = []
        positions: list[int] = []
        for i, item in enumerate(items):
            try:
                adapter = self._adapter(item.adapter_id)
                prepared.append(
                    prepare_item(item, adapter.key, self.vocab_size, self.max_context_length, self.device)
                )
                positions.append(i)
            except Exception as e:
                results[i] = e
        if prepared:
            by_key = {a.key: a for a in self._adapters.resident()}
            try:
                outputs = self._run_batch(prepared, by_key)
            except Exception as e:  # the shared pass failed (e.g. out of memory): all of it failed
                outputs = [e] * len(prepared)
            for i, output in zip(positions, outputs, strict=True):
                results[i] = output
        return [result for result in results if result is not None]  # every item has its result

    def _run_batch(
        self, prepared: list[PreparedItem], adapters: dict[str, TrainableAdapter]
    ) -> list[ForwardBackwardOutput | Exception]:
        """The merged pass of a cycle's valid items (a sharded engine splits it over its ranks)."""
        return forward_backward_batch(self.model, self.routing, prepared, adapters, self.checkpoint_tokens)

    def gradients(self, adapter_id: str) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """The gradients accumulated since the last ``optim_step`` (A, B per module path; None:
        none yet), as CPU copies: for diagnostics and tests."""
        adapter = self._adapter(adapter_id)
        return {
            path: tuple(None if p.grad is None else p.grad.detach().cpu().clone() for p in pair)  # type: ignore[misc]
            for path, pair in adapter.weights.items()
        }

    def optim_step(self, adapter_id: str, params: AdamParams) -> dict[str, float]:
        """Apply AdamW with ``params`` to the accumulated gradients, then clear them.

        Inside ``joint_optim_steps`` the metrics (and clipping) come at once and the update is
        applied with the others' when the block ends (or before anything else uses an adapter).
        """
        if self._deferred is None:
            return self._adapter(adapter_id).optim_step(params)
        if adapter_id not in self._adapters:
            raise KeyError(f"adapter_id: no adapter {adapter_id!r} on {self.model_name}")
        if not self._adapters.in_slot(adapter_id) or any(a == adapter_id for a, _, _ in self._deferred):
            self._apply_deferred()  # bringing an adapter to a slot may move a waiting one away
        adapter = self._adapters.get(adapter_id)
        metrics = adapter.clip_and_measure(params)
        self._deferred.append((adapter_id, adapter, params))
        return metrics

    @contextlib.contextmanager
    def joint_optim_steps(self) -> Iterator[None]:
        """Within the block, ``optim_step``s of many adapters become ONE fused AdamW update over
        all their tensors, applied when the block ends (a clock cycle's barriers run in one).

        The result is the same as stepping each adapter alone: the fused kernel updates each
        tensor independently. An error in the joint update is raised when the block ends.
        """
        self._apply_deferred()
        self._deferred = []
        try:
            yield
        finally:
            try:
                self._apply_deferred()
            finally:
                self._deferred = None

    def _apply_deferred(self) -> None:
        if self._deferred:
            steps = [(adapter, params) for _, adapter, params in self._deferred]
            self._deferred.clear()  # cleared first: a failed update is never applied twice
            adamw_steps(steps)

    # -- checkpoints ------------------------------------------------------------------------

    def _checkpoint(self, adapter: TrainableAdapter) -> AdapterCheckpoint:
        targets = list(adapter.weights)
        return AdapterCheckpoint(
            base_model=self.model_name,
            # copies: the weights are views of one flat tensor (optimizer.py), which safetensors
            # refuses to save, and a snapshot must not follow later training
            weights={path: (A.detach().clone(), B.detach().clone()) for path, (A, B) in adapter.weights.items()},
            scaling=adapter.scaling,
            lora_alpha=LORA_ALPHA,
            target_modules=checkpoints.peft_target_modules(targets, sorted(self.layers)),
        )

    def save_state(self, adapter_id: str, directory: Path, include_optimizer: bool = True) -> None:
        """Save weights, config and step (and the AdamW state) for resuming training."""
        adapter = self._adapter(adapter_id)
        checkpoint = self._checkpoint(adapter)
        checkpoint.lora_config = adapter.config
        checkpoint.step = adapter.step
        if include_optimizer:
            checkpoint.optimizer_state = adapter.optimizer.state_dict()
        checkpoints.write_checkpoint(directory, checkpoint)

    def save_sampler_weights(self, adapter_id: str, directory: Path) -> None:
        """Save the adapter's weights in PEFT format only (for sampling, vLLM or peft)."""
        checkpoints.write_checkpoint(directory, self._checkpoint(self._adapter(adapter_id)))

    def load_state(self, adapter_id: str, directory: Path, include_optimizer: bool) -> LoraConfig:
        """Load a checkpoint into ``adapter_id``, creating or replacing it; returns its config.

        Accumulated gradients are dropped. Without ``include_optimizer`` (or if the files hold
        no optimizer state) the AdamW state starts fresh.

        A plain PEFT adapter (made elsewhere: no ``tinker_state.json``) trains every linear of the
        kinds it touches (attention, MLP, ``lm_head``), as a Tinker ``LoraConfig`` selects kinds;
        the modules of those kinds it lacks start with a fresh A and B = 0, so the model computes
        exactly what the adapter does.
        """
        checkpoint = checkpoints.read_checkpoint(directory, with_optimizer=include_optimizer)
        weights = self._checked_weights(directory, checkpoint)
        if checkpoint.lora_config is None:
            config, weights = self._completed(checkpoint)
        else:
            config = checkpoint.lora_config
        expected = set(lora_target_paths(self.layers, config))
        if set(weights) != expected:
            raise ValueError(
                f"{directory}: the adapter's modules {sorted(weights)} do not match its config "
                f"(expected {sorted(expected)})"
            )
        # Training always uses alpha = LORA_ALPHA; fold any other scaling into B.
        scaling = LORA_ALPHA / config.rank
        factor = checkpoint.scaling / scaling
        weights = {path: (A, B * factor) for path, (A, B) in weights.items()}
        adapter = TrainableAdapter(_train_key(adapter_id), config, weights, scaling, self.device)
        adapter.step = checkpoint.step
        if checkpoint.optimizer_state is not None:
            adapter.optimizer.load_state_dict(checkpoint.optimizer_state)
        self._install(adapter_id, adapter)  # only now, so a failed load leaves the old adapter
        return config

    def _completed(
        self, checkpoint: AdapterCheckpoint
    ) -> tuple[LoraConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """A plain PEFT adapter's config (the kinds it touches, a new seed) and its weights,
        completed with fresh ones (B = 0) for the modules of those kinds it lacks."""
        kinds = {self.layers[path].kind for path in checkpoint.weights}
        config = LoraConfig(
            rank=checkpoint.rank,
            seed=secrets.randbelow(2**31),
            train_attn="attn" in kinds,
            train_mlp="mlp" in kinds,
            train_unembed="unembed" in kinds,
        )
        assert config.seed is not None
        fresh = init_lora_weights(self.layers, config, config.seed)
        return config, {**fresh, **checkpoint.weights}

    def _checked_weights(
        self, directory: Path, checkpoint: AdapterCheckpoint
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        problems = []
        for path, (A, B) in checkpoint.weights.items():
            layer = self.layers.get(path)
            if layer is None:
                problems.append(
                    f"{path}: not a linear layer of attention, MLP or the output embedding of {self.model_name}"
                )
            elif A.shape[1] != layer.in_features or B.shape[0] != layer.out_features:
                problems.append(
                    f"{path}: expected lora_A [r, {layer.in_features}] and lora_B [{layer.out_features}, r], "
                    f"got {list(A.shape)} and {list(B.shape)}"
                )
        for path, weight in checkpoint.base_weights.items():  # peft saves lm_head's: the base's own?
            layer = self.layers.get(path)
            if layer is None or not _same_weight(weight, layer.base.weight):
                problems.append(f"{path}: expected the base model's own weight in {path}.base_layer.weight, got another")
        if problems:
            made_for = checkpoint.base_model or "another model"
            raise ValueError(
                f"{directory}: adapter (made for {made_for!r}) does not fit {self.model_name}: " + "; ".join(problems)
            )
        return checkpoint.weights

    # -- samplers ---------------------------------------------------------------------------

    def snapshot_sampler(self, adapter_id: str, sampler_id: str) -> None:
        """Publish a frozen copy of the adapter's current weights for sampling as ``sampler_id``."""
        self._add_sampler(sampler_id, self._checkpoint(self._adapter(adapter_id)))

    def load_sampler(self, sampler_id: str, directory: Path) -> None:
        """Publish the PEFT adapter in ``directory`` for sampling as ``sampler_id``."""
        checkpoint = checkpoints.read_checkpoint(directory)
        self._checked_weights(directory, checkpoint)
        self._add_sampler(sampler_id, checkpoint)

    def _add_sampler(self, sampler_id: str, checkpoint: AdapterCheckpoint) -> None:
        if sampler_id in self._samplers:
            raise ValueError(f"sampler_id: {sampler_id!r} already exists")
        self.sampler.add_adapter(sampler_id, checkpoint)
        self._samplers.add(sampler_id)

    def remove_sampler(self, sampler_id: str) -> None:
        if sampler_id not in self._samplers:
            raise KeyError(f"sampler_id: no sampler {sampler_id!r} on {self.model_name}")
        self.sampler.remove_adapter(sampler_id)
        self._samplers.discard(sampler_id)

    def has_sampler(self, sampler_id: str) -> bool:
        return sampler_id in self._samplers

    def _check_prompt(self, field: str, tokens: list[int], room: int) -> None:
        if not tokens:
            raise ValueError(f"{field}: expected at least one token, got []")
        if len(tokens) + room > self.max_context_length:
            raise ValueError(
                f"{field}: {len(tokens)} tokens (+ {room} to generate) exceed max_context_length "
                f"{self.max_context_length}"
            )
        bad = next((i for i, t in enumerate(tokens) if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(
                f"{field}[{bad}]: expected a token id in [0, {self.vocab_size}), got {tokens[bad]}"
            )

    def submit_sample(
        self,
        sampler_id: str | None,
        prompt: list[int],
        num_samples: int,
        params: SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> Future[SampleResponse]:
        """Validate a sample request and queue it with the sampler; thread-safe, returns at once.

        ``sampler_id`` None samples the base model. Invalid requests raise here (``ValueError``
        or ``KeyError`` naming the field), before they can join a shared batch. With the torch
        sampler the answer comes once the compute thread has stepped ``self.sampler`` enough.
        """
        if sampler_id is not None and sampler_id not in self._samplers:
            raise KeyError(f"sampler_id: no sampler {sampler_id!r} on {self.model_name}")
        if num_samples < 1:
            raise ValueError(f"num_samples: expected an int >= 1, got {num_samples}")
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_context_length - len(prompt)
        self._check_prompt("prompt", prompt, max(max_tokens, 1))
        stop = StopCriteria.from_params(params, self.eos_token_ids, self._decode)
        request = SampleRequest(
            sampler_id, list(prompt), num_samples, params, max_tokens, stop, include_prompt_logprobs, topk_prompt_logprobs
        )
        return self.sampler.submit(request)

    def sample(
        self,
        sampler_id: str | None,
        prompt: list[int],
        num_samples: int,
        params: SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> SampleResponse:
        """``submit_sample`` and wait for the answer, stepping the sampler on this thread
        (so it must be the compute thread, or a program with no scheduler)."""
        future = self.submit_sample(
            sampler_id, prompt, num_samples, params, include_prompt_logprobs, topk_prompt_logprobs
        )
        while not future.done() and self.sampler.step():
            pass
        return future.result()

    def _decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=False))

    def compute_logprobs(self, sampler_id: str | None, tokens: list[int]) -> list[float | None]:
        """Log-probability of each token given the ones before it (None for the first)."""
        response = self.sample(sampler_id, tokens, 1, SamplingParams(max_tokens=1), include_prompt_logprobs=True)
        assert response.prompt_logprobs is not None
        return response.prompt_logprobs

"""The sampler interface, and the sampling semantics every sampler implements.

A ``ModelEngine`` owns one sampler, chosen by name (``SAMPLERS``):

* ``torch`` (default): :class:`~tinker_backend.engine.batcher.SamplingBatcher`, continuous
  batching on the engine's own weights and LoRA layers, stepped by the scheduler's compute
  thread between training clock cycles;
* ``vllm``: :class:`~tinker_backend.engine.routed_sampler.RoutedSampler` over
  :class:`~tinker_backend.engine.vllm_sampler.VllmSampler`, vLLM's async engine with
  multi-LoRA, running on its own thread (and its own copy of the base weights), and the torch
  sampler for the adapters vLLM cannot serve (a LoRA on ``lm_head``).

Semantics shared by both (``SamplingParams``): a sequence ends at a stop token id (EOS
included unless ``stop=[]``), or at the token that completes a stop string (kept), or after
``max_tokens`` tokens. ``temperature=0`` is greedy; ``top_k`` and ``top_p`` truncate the
tempered distribution. Log-probabilities are those of the raw model distribution (temperature
1, before top-k / top-p), in fp32, which is what the trainer computes for the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tinker.types import SampleResponse, SamplingParams

from ..checkpoints import AdapterCheckpoint

__all__ = [
    "SAMPLERS",
    "SampleRequest",
    "Sampler",
    "StopCriteria",
    "choose_tokens",
    "prompt_logprobs",
    "row_generators",
    "target_logprobs",
]

SAMPLERS = ("torch", "vllm")


@dataclass
class StopCriteria:
    """When a sequence ends: a stop token id (EOS included unless disabled) or a stop string.

    A stop string is found in the decoded text of the generated tokens, also when it spans
    several tokens; the token that completes it ends the sequence and is kept.
    """

    token_ids: frozenset[int]
    strings: list[str]
    decode: Callable[[list[int]], str]
    _window: int = field(init=False)

    def __post_init__(self) -> None:
        # A character is at most 4 byte-level tokens; a margin absorbs decoders that strip or
        # merge at the window's first token. Decoding a window keeps each check O(1) in length.
        self._window = 4 * max((len(s) for s in self.strings), default=0) + 4

    @classmethod
    def from_params(
        cls, params: SamplingParams, eos_token_ids: set[int], decode: Callable[[list[int]], str]
    ) -> StopCriteria:
        ids = set(params.stop_token_ids())
        if params.stop != []:  # an explicitly empty list disables every stop, EOS included
            ids |= eos_token_ids
        return cls(frozenset(ids), params.stop_strings(), decode)

    def is_done(self, tokens: list[int]) -> bool:
        """Whether the last token of ``tokens`` (the generated ones so far) ends the sequence."""
        if tokens[-1] in self.token_ids:
            return True
        if not self.strings:
            return False
        text = self.decode(tokens[-self._window :])
        return any(s in text for s in self.strings)


@dataclass
class SampleRequest:
    """One validated ``sample`` call, as the engine hands it to its sampler.

    ``sampler_id`` None samples the base model. ``max_tokens`` is resolved (never None) and
    ``prompt`` + ``max_tokens`` fits the model's context.
    """

    sampler_id: str | None
    prompt: list[int]
    num_samples: int
    params: SamplingParams
    max_tokens: int
    stop: StopCriteria
    include_prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.include_prompt_logprobs or self.topk_prompt_logprobs > 0


class Sampler(Protocol):
    """What a ``ModelEngine`` needs from a sampler.

    ``add_adapter`` / ``remove_adapter`` run on the engine's compute thread, in the order of the
    training calls that publish them; ``submit`` is thread-safe and returns at once. ``step`` is
    how the compute thread lends time to a sampler that computes on it: the torch sampler does
    one unit of work (a prefill chunk and a decode step) per call; the vLLM one never has work
    there, as it runs on its own thread (``RoutedSampler`` steps its torch sampler).
    """

    def add_adapter(self, sampler_id: str, checkpoint: AdapterCheckpoint) -> None:
        """Serve ``checkpoint`` (a frozen copy: later training does not change it) as ``sampler_id``."""

    def remove_adapter(self, sampler_id: str) -> None: ...

    def submit(self, request: SampleRequest) -> Future[SampleResponse]: ...

    def has_work(self) -> bool:
        """Whether ``step`` has something to do now."""

    def step(self) -> bool:
        """Do one unit of work on the calling thread; return ``has_work()`` after it."""

    def close(self) -> None: ...


def row_generators(seed: int | None, n: int, device: torch.device) -> list[torch.Generator]:
    """One generator per sample of a request, derived from the request's ``seed``.

    A sample's draws depend only on ``(seed, its index)``, never on the other rows that share a
    batch, so a seed reproduces a request's tokens whatever else is being sampled.
    """
    root = torch.Generator()
    if seed is None:
        root.seed()
    else:
        root.manual_seed(seed)
    seeds = torch.randint(0, 2**62, (n,), generator=root).tolist()
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def choose_tokens(
    logits: torch.Tensor, params: SamplingParams, generators: Sequence[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of ``logits`` [rows, vocab], row ``i`` drawing from
    ``generators[i]``; return (tokens, their raw logprobs).

    A draw is by inverse CDF: one uniform number per row from its own generator, then one
    batched ``searchsorted`` over the (tempered, truncated) distribution's CDF in float64. One
    tiny random call per row is what keeps per-row generators cheap in a large batch.
    """
    logits = logits.float()
    logprobs = logits.log_softmax(-1)
    if params.temperature == 0:
        tokens = logits.argmax(-1)
    else:
        scores = logits / params.temperature
        if params.top_k != -1 and params.top_k < scores.shape[-1]:
            kth = scores.topk(params.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = scores.softmax(-1)
        if params.top_p < 1:
            sorted_probs, order = probs.sort(-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        uniform = torch.cat(
            [torch.rand(1, generator=g, device=logits.device, dtype=torch.float64) for g in generators]
        )
        cdf = probs.double().cumsum(-1)
        # right=True: the first token whose CDF exceeds the draw, so zero-mass tokens never win.
        tokens = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).squeeze(-1)
        tokens = tokens.clamp_(max=probs.shape[-1] - 1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def target_logprobs(
    logits: torch.Tensor, targets: Sequence[int], topk: int = 0
) -> tuple[list[float], list[list[tuple[int, float]]] | None]:
    """Log-probability of ``targets[i]`` under ``logits[i]``, and, when ``topk > 0``, the ``topk``
    most likely (token, logprob) pairs of each row. Only the first ``len(targets)`` rows are used."""
    logprobs = logits[: len(targets)].float().log_softmax(-1)
    ids = torch.tensor(list(targets), dtype=torch.long, device=logits.device)
    values: list[float] = logprobs.gather(-1, ids[:, None]).squeeze(-1).tolist()
    if topk <= 0:
        return values, None
    top = logprobs.topk(min(topk, logprobs.shape[-1]), dim=-1)
    pairs = [
        list(zip(tok, lp, strict=True)) for tok, lp in zip(top.indices.tolist(), top.values.tolist(), strict=True)
    ]
    return values, pairs


def prompt_logprobs(
    logits: torch.Tensor, prompt: Sequence[int], topk: int = 0
) -> tuple[list[float | None], list[list[tuple[int, float]] | None] | None]:
    """Log-probabilities of each prompt token given the ones before it (None at position 0),
    and, when ``topk > 0``, the ``topk`` most likely (token, logprob) pairs per position."""
    values, pairs = target_logprobs(logits, prompt[1:], topk)
    return [None, *values], None if pairs is None else [None, *pairs]

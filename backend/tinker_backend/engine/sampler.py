"""A torch sampler with a KV cache: prefill the prompt once, then decode all samples as a batch.

This first version serves one request at a time; ``decode_step`` and ``choose_tokens`` already
work on a batch of rows so that continuous batching can reuse them. Log-probabilities are
always those of the raw model distribution (temperature 1, before top-k / top-p), in fp32,
which is what the trainer computes for the same tokens.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from tinker.types import SampledSequence, SampleResponse, SamplingParams

from .lora import LoraRouting, Segment

__all__ = [
    "StopCriteria",
    "choose_tokens",
    "decode_step",
    "prompt_logprobs",
    "sample",
]


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


@functools.cache
def _cache_kwarg(forward: Callable[..., Any]) -> str:
    # transformers >= 5.2x names the KV-cache argument ``cache``; earlier ones ``past_key_values``.
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def decode_step(model: PreTrainedModel, tokens: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Feed one new token per row ([rows, 1]) and return the next-token logits [rows, vocab]."""
    out = model(
        input_ids=tokens, use_cache=True, logits_to_keep=1, **{_cache_kwarg(type(model).forward): cache}
    )
    return out.logits[:, -1]


def choose_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of ``logits`` [rows, vocab]; return (tokens, their raw logprobs)."""
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
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def prompt_logprobs(
    logits: torch.Tensor, prompt: Sequence[int], topk: int = 0
) -> tuple[list[float | None], list[list[tuple[int, float]] | None] | None]:
    """Log-probabilities of each prompt token given the ones before it (None at position 0),
    and, when ``topk > 0``, the ``topk`` most likely (token, logprob) pairs per position."""
    logprobs = logits[: len(prompt) - 1].float().log_softmax(-1)
    targets = torch.tensor(prompt[1:], dtype=torch.long, device=logits.device)
    values: list[float | None] = [None, *logprobs.gather(-1, targets[:, None]).squeeze(-1).tolist()]
    if topk <= 0:
        return values, None
    top = logprobs.topk(min(topk, logprobs.shape[-1]), dim=-1)
    pairs: list[list[tuple[int, float]] | None] = [None]
    for ids, lps in zip(top.indices.tolist(), top.values.tolist(), strict=True):
        pairs.append(list(zip(ids, lps, strict=True)))
    return values, pairs


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    routing: LoraRouting,
    adapter_key: str | None,
    prompt: Sequence[int],
    num_samples: int,
    params: SamplingParams,
    max_tokens: int,
    stop: StopCriteria,
    include_prompt_logprobs: bool = False,
    topk_prompt_logprobs: int = 0,
) -> SampleResponse:
    """Sample ``num_samples`` continuations of ``prompt`` of at most ``max_tokens`` tokens each.

    ``adapter_key`` (None: base model) is routed for every row. The prompt is prefilled once and
    its cache repeated per sample. Draws come from one generator seeded with ``params.seed``, so
    the same seed gives the same sequences.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)

    want_prompt = include_prompt_logprobs or topk_prompt_logprobs > 0
    routing.set([Segment(adapter_key, 0, 1, False)])
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=torch.tensor([list(prompt)], device=device),
        use_cache=True,
        logits_to_keep=0 if want_prompt else 1,
        **{_cache_kwarg(type(model).forward): cache},
    )
    values, pairs = None, None
    if want_prompt:
        values, pairs = prompt_logprobs(out.logits[0], prompt, topk_prompt_logprobs)

    cache.batch_repeat_interleave(num_samples)
    routing.set([Segment(adapter_key, 0, num_samples, False)])
    logits = out.logits[:, -1].expand(num_samples, -1)
    tokens: list[list[int]] = [[] for _ in range(num_samples)]
    logprobs: list[list[float]] = [[] for _ in range(num_samples)]
    reasons: list[str | None] = [None] * num_samples
    for step in range(max_tokens):
        chosen, chosen_lp = choose_tokens(logits, params, generator)
        for row, (tok, lp) in enumerate(zip(chosen.tolist(), chosen_lp.tolist(), strict=True)):
            if reasons[row] is not None:
                continue
            tokens[row].append(tok)
            logprobs[row].append(lp)
            if stop.is_done(tokens[row]):
                reasons[row] = "stop"
            elif step == max_tokens - 1:
                reasons[row] = "length"
        if all(reasons):
            break
        # Finished rows keep decoding (their tokens are ignored) so the batch shape stays fixed.
        logits = decode_step(model, chosen[:, None], cache)
    sequences = [
        SampledSequence(stop_reason=reason, tokens=toks, logprobs=lps)
        for reason, toks, lps in zip(reasons, tokens, logprobs, strict=True)
    ]
    return SampleResponse(
        sequences=sequences,
        prompt_logprobs=values if include_prompt_logprobs else None,
        topk_prompt_logprobs=pairs,
    )

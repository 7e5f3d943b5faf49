"""RLHF in three stages, one command: SFT on preferred replies, a pairwise judge trained on
preference pairs, then RL of the SFT policy against the judge.

    python -m tinker_cookbook.recipes.rlhf.train
    python -m tinker_cookbook.recipes.rlhf.train model_name=tiny-llama log_path=/tmp/rlhf max_steps=2

The data are verifier-labelled calculator pairs (``rlhf/data.py``). Each stage is a run in its
own folder under ``log_path`` with ``metrics.jsonl`` and ``checkpoints.jsonl``; the next stage
reads the previous ones' ``final`` checkpoints, and a rerun with ``if_exists=resume`` skips the
finished stages and resumes the others:

1. ``sft/``: SFT on the chosen replies (``train_mean_nll``, ``test/nll``).
2. ``judge/``: SFT of a fresh adapter on the pairs, shown both ways round, to answer ``A`` or
   ``B`` (``train_mean_nll``; ``judge/accuracy`` on held-out pairs before and after).
3. ``rl/``: RL from the SFT weights; each group's replies are compared pairwise by the judge
   and a reply's reward is its mean win rate (``reward/total``). ``test/win_rate`` is the
   judge's preference for the policy's greedy replies over the SFT model's on held-out
   questions; ``test/correct``, ``test/reference_correct`` and ``test/true_win_rate`` check
   the same replies with the scorer (never seen by the policy's reward).

``max_steps`` is the RL stage's; ``sft_steps`` and ``judge_steps`` the other two.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tinker
from tinker_cookbook import checkpoint_utils
from tinker_cookbook.preference.judge import (
    JudgeAccuracyEvaluator,
    PairwiseJudge,
    PromptDataset,
    Scorer,
    WinRateEvaluator,
    judge_training_rows,
)
from tinker_cookbook.recipes.rlhf.data import accepted, comparisons, prompt_of, questions, sft_rows
from tinker_cookbook.renderers import Renderer, TrainOnWhat, get_recommended_renderer_name, get_renderer
from tinker_cookbook.rl import train as rl_train
from tinker_cookbook.supervised import train as sl_train
from tinker_cookbook.supervised.data import ConversationDataset, SupervisedDataset, split_rows
from tinker_cookbook.utils.cli import parse_cli
from tinker_cookbook.utils.misc import IfExists, check_log_dir


@dataclass
class CLIConfig:
    model_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    log_path: str = "runs/rlhf"
    max_steps: int = 12  # RL steps
    sft_steps: int = 6
    judge_steps: int = 16
    n_train: int = 192  # training questions (pairs, SFT rows and RL prompts)
    n_test: int = 32  # held-out questions (judge accuracy, win rate, test NLL)
    sft_batch_size: int = 16
    judge_batch_size: int = 16
    batch_size: int = 4  # RL prompts per step
    group_size: int = 4
    max_tokens: int = 16
    sft_learning_rate: float = 2e-4
    judge_learning_rate: float = 5e-4
    learning_rate: float = 1e-4
    lora_rank: int = 16
    eval_every: int = 4
    seed: int | None = 0  # data, LoRA initialisation and sampling seeds; None: random
    base_url: str | None = None
    if_exists: IfExists = "raise"


@dataclass
class RowsBuilder:
    """Fixed train and test conversation rows as a supervised dataset builder."""

    train_rows: list
    test_rows: list
    batch_size: int
    train_on_what: TrainOnWhat = TrainOnWhat.LAST_ASSISTANT_MESSAGE

    def __call__(self, renderer: Renderer) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        train, _ = split_rows(self.train_rows, renderer, self.batch_size, None, 0, self.train_on_what)
        return train, ConversationDataset(self.test_rows, renderer, len(self.test_rows), None, self.train_on_what, shuffle=False)


def final_checkpoint(log_path: Path) -> dict:
    """The ``final`` checkpoint record of a finished stage."""
    records = [r for r in checkpoint_utils.load_checkpoints(log_path) if r.get("final")]
    if not records:
        raise RuntimeError(f"{log_path}: the stage did not finish (no final checkpoint in checkpoints.jsonl)")
    return records[-1]


async def main(cli: CLIConfig) -> None:
    root = Path(cli.log_path)
    seed = cli.seed or 0
    qa = questions(cli.n_train + cli.n_test, seed)
    train_qa, test_qa = qa[: cli.n_train], qa[cli.n_train :]
    train_pairs, test_pairs = comparisons(train_qa, seed), comparisons(test_qa, seed + 1)
    common: dict[str, Any] = dict(model_name=cli.model_name, lora_rank=cli.lora_rank, base_url=cli.base_url, seed=cli.seed, save_every=0)

    if not _finished(root / "sft"):
        await sl_train.main(sl_train.Config(
            log_path=str(root / "sft"), dataset_builder=RowsBuilder(sft_rows(train_pairs), sft_rows(test_pairs), cli.sft_batch_size),
            learning_rate=cli.sft_learning_rate, max_steps=cli.sft_steps, num_epochs=100, eval_every=0, **common,
        ))
    sft = final_checkpoint(root / "sft")

    service = tinker.ServiceClient(base_url=cli.base_url)
    base = service.create_sampling_client(base_model=cli.model_name)
    renderer = get_renderer(get_recommended_renderer_name(cli.model_name), base.get_tokenizer())
    if not _finished(root / "judge"):
        await sl_train.main(sl_train.Config(
            log_path=str(root / "judge"),
            dataset_builder=RowsBuilder(judge_training_rows(train_pairs), judge_training_rows(test_pairs), cli.judge_batch_size),
            learning_rate=cli.judge_learning_rate, max_steps=cli.judge_steps, num_epochs=100, eval_every=cli.judge_steps,
            evaluators=[JudgeAccuracyEvaluator(test_pairs, renderer)], **common,
        ))
    judge = PairwiseJudge(service.create_sampling_client(model_path=final_checkpoint(root / "judge")["sampler_path"]), renderer)

    answers = {q: a for q, a in qa}
    train_prompts, test_prompts = [prompt_of(q) for q, _ in train_qa], [prompt_of(q) for q, _ in test_qa]

    def train_scorer(reply: str, i: int) -> bool:
        return accepted(reply, answers[train_qa[i][0]])

    def test_scorer(reply: str, i: int) -> bool:
        return accepted(reply, answers[test_qa[i][0]])

    await rl_train.main(rl_train.Config(
        log_path=str(root / "rl"), dataset_builder=_RLBuilder(train_prompts, judge, cli.batch_size, cli.group_size,
                                                               cli.max_steps, train_scorer),
        load_checkpoint_path=sft["state_path"], learning_rate=cli.learning_rate, max_tokens=cli.max_tokens,
        max_steps=cli.max_steps, eval_every=cli.eval_every,
        evaluators=[WinRateEvaluator(test_prompts, judge, service.create_sampling_client(model_path=sft["sampler_path"]),
                                     renderer, cli.max_tokens, test_scorer)],
        **common,
    ))


@dataclass
class _RLBuilder:
    prompts: list
    judge: PairwiseJudge
    batch_size: int
    group_size: int
    n_batches: int
    scorer: Scorer

    def __call__(self, renderer: Renderer) -> tuple[PromptDataset, None]:
        return PromptDataset(self.prompts, renderer, self.judge, self.batch_size, self.group_size, self.n_batches,
                             self.scorer), None


def _finished(log_path: Path) -> bool:
    return any(r.get("final") for r in checkpoint_utils.load_checkpoints(log_path))


if __name__ == "__main__":
    cli = parse_cli(CLIConfig)
    check_log_dir(cli.log_path, cli.if_exists)
    asyncio.run(main(cli))

"""Twenty questions: the policy asks yes/no questions about a secret animal; a frozen sampler of
the base model, told the secret, answers them.

Player 0 (trained) asks; player 1 (the answerer, not trained) sees only the secret and the
latest question and answers. The episode ends when a question names the secret (solved) or
after ``max_questions`` questions::

    system: Guess my secret animal: cat, dog, horse, cow, fish, bird, lion or bear. Ask yes/no
            questions; name it to win.
    assistant: Does it bark?      user: Yes.
    assistant: Is it a dog?       -> solved: reward 1

A question solves the game when it names the secret and no other animal of the list, so
listing every animal in one question does not win.

Reward: ``1`` when solved, plus ``question_bonus`` times the asker's mean question score
(shaping, a format signal a policy can learn before it ever names the secret): per turn,
``0.5`` for a yes/no question word (is, does, can, ...) and ``0.5`` for ending with ``?``.
Metrics: ``solved``, ``questions`` (share of turns ending with ``?``), ``question_score``,
``turns``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import tinker
from tinker_cookbook.completers import MessageCompleter, TinkerMessageCompleter
from tinker_cookbook.multiplayer_rl.coordinator import GameCoordinator, PlayerEnv, TurnBasedGame
from tinker_cookbook.renderers import Message, Renderer
from tinker_cookbook.rl.types import Env, EnvGroupBuilder, RLDataset

ANIMALS = ("cat", "dog", "horse", "cow", "fish", "bird", "lion", "bear")
ASKER, ANSWERER = 0, 1
_WORD = re.compile(r"[a-z]+")
YES_NO_WORDS = frozenset({"is", "are", "was", "does", "do", "did", "can", "could", "has", "have", "will", "would"})


def question_score(turn: str) -> float:
    """0.5 for a yes/no question word, 0.5 for ending with ``?`` (the shaping term's unit)."""
    words = set(_WORD.findall(turn.lower()))
    return 0.5 * bool(words & YES_NO_WORDS) + 0.5 * turn.strip().endswith("?")


class TwentyQuestionsGame(TurnBasedGame):
    def __init__(self, secret: str, max_questions: int, question_bonus: float) -> None:
        self.secret, self.max_questions, self.question_bonus = secret, max_questions, question_bonus
        listed = ", ".join(ANIMALS[:-1]) + f" or {ANIMALS[-1]}"
        self.history: list[Message] = [
            Message(role="system", content=f"Guess my secret animal: {listed}. Ask yes/no questions; name it to win.")
        ]
        self.questions: list[str] = []
        self.answers: list[str] = []

    def current_player(self) -> int:
        return ASKER if len(self.answers) == len(self.questions) else ANSWERER

    def messages(self, player: int) -> list[Message]:
        if player == ASKER:
            return list(self.history)
        return [
            Message(role="system", content=f"The secret animal is: {self.secret}. Answer the question with Yes or No."),
            Message(role="user", content=self.questions[-1]),
        ]

    def play(self, player: int, reply: str) -> None:
        if player == ASKER:
            self.questions.append(reply)
            self.history.append(Message(role="assistant", content=reply))
        else:
            words = reply.strip().split()
            answer = words[0].strip(".,!").capitalize() + "." if words else "No answer."
            self.answers.append(answer)
            self.history.append(Message(role="user", content=answer))

    def solved(self) -> bool:
        named = set(_WORD.findall(self.questions[-1].lower())) & set(ANIMALS) if self.questions else set()
        return named == {self.secret}

    def is_over(self) -> bool:
        return self.solved() or (len(self.questions) >= self.max_questions and self.current_player() == ASKER)

    def question_share(self) -> float:
        return sum(q.strip().endswith("?") for q in self.questions) / len(self.questions)

    def mean_question_score(self) -> float:
        return sum(map(question_score, self.questions)) / len(self.questions)

    def reward(self, player: int) -> float:
        return float(self.solved()) + self.question_bonus * self.mean_question_score()

    def metrics(self, player: int) -> dict[str, float]:
        return {
            "solved": float(self.solved()),
            "questions": self.question_share(),
            "question_score": self.mean_question_score(),
            "turns": float(len(self.questions)),
        }


@dataclass(frozen=True)
class TwentyQuestionsGroupBuilder(EnvGroupBuilder):
    """``group_size`` games with the same secret, each with the shared frozen ``answerer``."""

    renderer: Renderer
    answerer: MessageCompleter
    secret: str
    group_size: int
    max_questions: int = 4
    question_bonus: float = 0.2

    async def make_envs(self) -> Sequence[Env]:
        envs = []
        for _ in range(self.group_size):
            game = TwentyQuestionsGame(self.secret, self.max_questions, self.question_bonus)
            envs.append(PlayerEnv(GameCoordinator(game, frozen={ANSWERER: self.answerer}), ASKER, self.renderer))
        return envs

    def logging_tags(self) -> list[str]:
        return ["twenty_questions"]


class TwentyQuestionsDataset(RLDataset):
    def __init__(self, renderer: Renderer, answerer: MessageCompleter, batch_size: int, group_size: int,
                 n_batches: int, seed: int, max_questions: int, question_bonus: float) -> None:
        rng = random.Random(seed)
        self.secrets = [[rng.choice(ANIMALS) for _ in range(batch_size)] for _ in range(n_batches)]
        self.renderer, self.answerer, self.group_size = renderer, answerer, group_size
        self.max_questions, self.question_bonus = max_questions, question_bonus

    def __len__(self) -> int:
        return len(self.secrets)

    def get_batch(self, index: int) -> list[EnvGroupBuilder]:
        return [
            TwentyQuestionsGroupBuilder(self.renderer, self.answerer, s, self.group_size, self.max_questions, self.question_bonus)
            for s in self.secrets[index]
        ]


@dataclass
class TwentyQuestionsDatasetBuilder:
    """The answerer samples from the base ``answerer_model`` (frozen), through its own service
    client on ``base_url`` (the embedded backend when None, shared with the training run)."""

    answerer_model: str
    batch_size: int
    group_size: int
    n_batches: int
    seed: int = 0
    max_questions: int = 4
    question_bonus: float = 0.2
    answerer_max_tokens: int = 4
    base_url: str | None = None

    def __call__(self, renderer: Renderer) -> tuple[RLDataset, RLDataset | None]:
        sampler = tinker.ServiceClient(base_url=self.base_url).create_sampling_client(base_model=self.answerer_model)
        # Greedy: the answerer's answer to a question never depends on the sampling seed.
        answerer = TinkerMessageCompleter(sampler, renderer, self.answerer_max_tokens, temperature=0.0)
        return TwentyQuestionsDataset(renderer, answerer, self.batch_size, self.group_size, self.n_batches,
                                      self.seed, self.max_questions, self.question_bonus), None

"""Guess the number: the policy guesses a secret integer, the environment answers higher/lower.

One trained player against the environment, over up to ``max_turns`` guesses::

    system: I picked a number from 1 to 20. Guess it; reply with a number.
    assistant: 10          user: Higher.
    assistant: 15          user: Lower.
    assistant: 13          -> correct: reward 1

Reward: 1 when the number is found; otherwise ``0.5 * (1 - |last guess - secret| / range)``
for the last reply that was a number (0 if none was), so getting closer pays before the first
exact hit. Metrics: ``solved``, ``valid_guesses`` (share of replies that were a number),
``guesses``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tinker_cookbook.multiplayer_rl.coordinator import GameCoordinator, PlayerEnv, TurnBasedGame
from tinker_cookbook.renderers import Message, Renderer
from tinker_cookbook.rl.types import Env, EnvGroupBuilder, RLDataset

_INT = re.compile(r"-?\d+")


class GuessNumberGame(TurnBasedGame):
    """The secret is in ``[low, high]``; the reply's first integer is the guess."""

    def __init__(self, secret: int, low: int, high: int, max_turns: int) -> None:
        self.secret, self.low, self.high, self.max_turns = secret, low, high, max_turns
        self.history: list[Message] = [
            Message(role="system", content=f"I picked a number from {low} to {high}. Guess it; reply with a number.")
        ]
        self.guesses: list[int | None] = []

    def current_player(self) -> int:
        return 0

    def messages(self, player: int) -> list[Message]:
        return list(self.history)

    def play(self, player: int, reply: str) -> None:
        match = _INT.search(reply)
        guess = int(match.group()) if match else None
        self.guesses.append(guess)
        self.history.append(Message(role="assistant", content=reply))
        if guess is None:
            feedback = f"Reply with a number from {self.low} to {self.high}."
        else:
            feedback = "Higher." if guess < self.secret else "Lower." if guess > self.secret else "Correct!"
        self.history.append(Message(role="user", content=feedback))

    def solved(self) -> bool:
        return bool(self.guesses) and self.guesses[-1] == self.secret

    def is_over(self) -> bool:
        return self.solved() or len(self.guesses) >= self.max_turns

    def reward(self, player: int) -> float:
        if self.solved():
            return 1.0
        valid = [g for g in self.guesses if g is not None]
        if not valid:
            return 0.0
        return 0.5 * max(0.0, 1.0 - abs(valid[-1] - self.secret) / (self.high - self.low))

    def metrics(self, player: int) -> dict[str, float]:
        return {
            "solved": float(self.solved()),
            "valid_guesses": sum(g is not None for g in self.guesses) / len(self.guesses),
            "guesses": float(len(self.guesses)),
        }


@dataclass(frozen=True)
class GuessNumberGroupBuilder(EnvGroupBuilder):
    """``group_size`` games with the same secret, one episode each."""

    renderer: Renderer
    secret: int
    group_size: int
    low: int = 1
    high: int = 20
    max_turns: int = 4

    async def make_envs(self) -> Sequence[Env]:
        games = [GuessNumberGame(self.secret, self.low, self.high, self.max_turns) for _ in range(self.group_size)]
        return [PlayerEnv(GameCoordinator(g), 0, self.renderer) for g in games]

    def logging_tags(self) -> list[str]:
        return ["guess_number"]


class GuessNumberDataset(RLDataset):
    """``n_batches`` batches of ``batch_size`` groups, secrets drawn with ``seed``."""

    def __init__(self, renderer: Renderer, batch_size: int, group_size: int, n_batches: int, seed: int,
                 low: int = 1, high: int = 20, max_turns: int = 4) -> None:
        rng = random.Random(seed)
        self.secrets = [[rng.randint(low, high) for _ in range(batch_size)] for _ in range(n_batches)]
        self.renderer, self.group_size, self.low, self.high, self.max_turns = renderer, group_size, low, high, max_turns

    def __len__(self) -> int:
        return len(self.secrets)

    def get_batch(self, index: int) -> list[EnvGroupBuilder]:
        return [
            GuessNumberGroupBuilder(self.renderer, s, self.group_size, self.low, self.high, self.max_turns)
            for s in self.secrets[index]
        ]


@dataclass
class GuessNumberDatasetBuilder:
    batch_size: int
    group_size: int
    n_batches: int
    seed: int = 0
    low: int = 1
    high: int = 20
    max_turns: int = 4

    def __call__(self, renderer: Renderer) -> tuple[RLDataset, RLDataset | None]:
        return GuessNumberDataset(renderer, self.batch_size, self.group_size, self.n_batches, self.seed,
                                  self.low, self.high, self.max_turns), None

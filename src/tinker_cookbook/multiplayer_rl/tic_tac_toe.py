"""Tic-tac-toe self-play: both sides are the policy being trained.

Each turn the player to move sees the board (cells numbered 1-9, taken ones marked X or O)
and replies with the number of a free cell::

    system: You play tic-tac-toe as X. Reply with the number of a free cell.
    user:  X | 2 | 3
           4 | O | 6
           7 | 8 | 9

A reply whose first number is not a free cell is an illegal move: it is counted, and a random
free cell (seeded per game) is played instead, so every game goes on to a real result.
Reward per player: ``+1`` win, ``-1`` loss, ``0`` draw, minus the share of its own moves that
were illegal. Outcomes cancel between the two players, so the mean reward measures legal
play: about ``-1`` for a policy that never names a free cell, ``0`` for one that always does.
A group holds both players of ``games_per_group`` games. Metrics: ``win``, ``draw``,
``illegal`` (share of own moves), ``moves``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tinker_cookbook.multiplayer_rl.coordinator import GameCoordinator, PlayerEnv, TurnBasedGame
from tinker_cookbook.renderers import Message, Renderer
from tinker_cookbook.rl.types import Env, EnvGroupBuilder, RLDataset

MARKS = ("X", "O")
LINES = [(0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6)]
_INT = re.compile(r"\d+")


class TicTacToeGame(TurnBasedGame):
    """Player 0 is X and moves first; player 1 is O."""

    def __init__(self, seed: int) -> None:
        self.board: list[int | None] = [None] * 9
        self.rng = random.Random(seed)
        self.moves = [0, 0]
        self.illegal = [0, 0]
        self.turn = 0

    def current_player(self) -> int:
        return self.turn

    def render_board(self) -> str:
        cells = [str(i + 1) if v is None else MARKS[v] for i, v in enumerate(self.board)]
        return "\n".join(" | ".join(cells[r * 3 : r * 3 + 3]) for r in range(3))

    def messages(self, player: int) -> list[Message]:
        return [
            Message(role="system", content=f"You play tic-tac-toe as {MARKS[player]}. Reply with the number of a free cell."),
            Message(role="user", content=self.render_board()),
        ]

    def free_cells(self) -> list[int]:
        return [i for i, v in enumerate(self.board) if v is None]

    def play(self, player: int, reply: str) -> None:
        match = _INT.search(reply)
        cell = int(match.group()) - 1 if match else -1
        if cell not in self.free_cells():
            self.illegal[player] += 1
            cell = self.rng.choice(self.free_cells())
        self.board[cell] = player
        self.moves[player] += 1
        self.turn = 1 - player

    def winner(self) -> int | None:
        for a, b, c in LINES:
            if self.board[a] is not None and self.board[a] == self.board[b] == self.board[c]:
                return self.board[a]
        return None

    def is_over(self) -> bool:
        return self.winner() is not None or not self.free_cells()

    def reward(self, player: int) -> float:
        winner = self.winner()
        outcome = 0.0 if winner is None else 1.0 if winner == player else -1.0
        return outcome - self.illegal[player] / self.moves[player]

    def metrics(self, player: int) -> dict[str, float]:
        winner = self.winner()
        return {
            "win": float(winner == player),
            "draw": float(winner is None),
            "illegal": self.illegal[player] / self.moves[player],
            "moves": float(self.moves[player]),
        }


@dataclass(frozen=True)
class SelfPlayGroupBuilder(EnvGroupBuilder):
    """Both players of ``games_per_group`` games, all played by the policy."""

    renderer: Renderer
    games_per_group: int
    seed: int

    async def make_envs(self) -> Sequence[Env]:
        envs: list[Env] = []
        for g in range(self.games_per_group):
            coordinator = GameCoordinator(TicTacToeGame(self.seed * 1_000 + g))
            envs += [PlayerEnv(coordinator, player, self.renderer) for player in (0, 1)]
        return envs

    def logging_tags(self) -> list[str]:
        return ["tic_tac_toe"]


class SelfPlayDataset(RLDataset):
    def __init__(self, renderer: Renderer, batch_size: int, games_per_group: int, n_batches: int, seed: int) -> None:
        self.renderer, self.batch_size, self.games_per_group, self.n_batches, self.seed = (
            renderer, batch_size, games_per_group, n_batches, seed,
        )

    def __len__(self) -> int:
        return self.n_batches

    def get_batch(self, index: int) -> list[EnvGroupBuilder]:
        base = (self.seed * 1_000_003 + index) * self.batch_size
        return [SelfPlayGroupBuilder(self.renderer, self.games_per_group, base + i) for i in range(self.batch_size)]


@dataclass
class SelfPlayDatasetBuilder:
    batch_size: int
    games_per_group: int
    n_batches: int
    seed: int = 0

    def __call__(self, renderer: Renderer) -> tuple[RLDataset, RLDataset | None]:
        return SelfPlayDataset(renderer, self.batch_size, self.games_per_group, self.n_batches, self.seed), None

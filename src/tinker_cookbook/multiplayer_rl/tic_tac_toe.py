"""Tic-tac-toe self-play: both sides are the policy being trained.

Each turn the player to move sees the board (cells numbered 1-9, taken ones marked X or O)
and replies with the number of a free cell::

    system: You play tic-tac-toe as X. Reply with the number of a free cell.
    user:  X | 2 | 3
           4 | O | 6
           7 | 8 | 9

The reply's first integer is the move. A move that is not a free cell is illegal: it forfeits
the game for its player, and a random free cell (seeded per game) is played in its place, so
that both players still play a whole game and every one of their moves is scored.

Reward per player: the outcome plus ``move_bonus`` times the player's mean move score.

* Outcome: ``-1`` if the player made an illegal move (both players can forfeit), else ``+1``
  if the opponent did, else the board decides (``+1`` win, ``-1`` loss, ``0`` draw). A player's
  outcome so depends on its own moves only: a random policy's games do not hand one side a
  random win, which would drown the signal in noise.
* Move score (shaping, so that a policy that never names a free cell still sees which replies
  were better): ``1`` for a legal move, ``0.5`` for a reply that names a number that is not a
  free cell, ``0`` for a reply with no number.

A group holds both players of ``games_per_group`` games. Metrics: ``win`` (outcome +1),
``draw``, ``illegal`` (share of own moves), ``moves``.
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

    def __init__(self, seed: int, move_bonus: float = 0.5) -> None:
        self.board: list[int | None] = [None] * 9
        self.rng = random.Random(seed)
        self.move_bonus = move_bonus
        self.scores: tuple[list[float], list[float]] = ([], [])  # per player, one per own move
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
        if cell in self.free_cells():
            self.scores[player].append(1.0)
        else:
            self.scores[player].append(0.5 if match else 0.0)
            cell = self.rng.choice(self.free_cells())
        self.board[cell] = player
        self.turn = 1 - player

    def illegal_share(self, player: int) -> float:
        return sum(s < 1.0 for s in self.scores[player]) / len(self.scores[player])

    def winner(self) -> int | None:
        for a, b, c in LINES:
            if self.board[a] is not None and self.board[a] == self.board[b] == self.board[c]:
                return self.board[a]
        return None

    def is_over(self) -> bool:
        return self.winner() is not None or not self.free_cells()

    def outcome(self, player: int) -> float:
        """-1 for a forfeit (an illegal move), +1 when only the opponent forfeited, else the board's."""
        if self.illegal_share(player) > 0:
            return -1.0
        if self.illegal_share(1 - player) > 0:
            return 1.0
        winner = self.winner()
        return 0.0 if winner is None else 1.0 if winner == player else -1.0

    def reward(self, player: int) -> float:
        scores = self.scores[player]
        return self.outcome(player) + self.move_bonus * sum(scores) / len(scores)

    def metrics(self, player: int) -> dict[str, float]:
        return {
            "win": float(self.outcome(player) == 1.0),
            "draw": float(self.outcome(player) == 0.0),
            "illegal": self.illegal_share(player),
            "moves": float(len(self.scores[player])),
        }


@dataclass(frozen=True)
class SelfPlayGroupBuilder(EnvGroupBuilder):
    """Both players of ``games_per_group`` games, all played by the policy."""

    renderer: Renderer
    games_per_group: int
    seed: int
    move_bonus: float = 0.5

    async def make_envs(self) -> Sequence[Env]:
        envs: list[Env] = []
        for g in range(self.games_per_group):
            coordinator = GameCoordinator(TicTacToeGame(self.seed * 1_000 + g, self.move_bonus))
            envs += [PlayerEnv(coordinator, player, self.renderer) for player in (0, 1)]
        return envs

    def logging_tags(self) -> list[str]:
        return ["tic_tac_toe"]


class SelfPlayDataset(RLDataset):
    def __init__(self, renderer: Renderer, batch_size: int, games_per_group: int, n_batches: int, seed: int,
                 move_bonus: float = 0.5) -> None:
        self.renderer, self.batch_size, self.games_per_group, self.n_batches, self.seed = (
            renderer, batch_size, games_per_group, n_batches, seed,
        )
        self.move_bonus = move_bonus

    def __len__(self) -> int:
        return self.n_batches

    def get_batch(self, index: int) -> list[EnvGroupBuilder]:
        base = (self.seed * 1_000_003 + index) * self.batch_size
        return [
            SelfPlayGroupBuilder(self.renderer, self.games_per_group, base + i, self.move_bonus)
            for i in range(self.batch_size)
        ]


@dataclass
class SelfPlayDatasetBuilder:
    batch_size: int
    games_per_group: int
    n_batches: int
    seed: int = 0
    move_bonus: float = 0.5

    def __call__(self, renderer: Renderer) -> tuple[RLDataset, RLDataset | None]:
        return SelfPlayDataset(renderer, self.batch_size, self.games_per_group, self.n_batches, self.seed,
                               self.move_bonus), None

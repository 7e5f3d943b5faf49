"""Turn-taking between the players of one game.

A game is one :class:`TurnBasedGame` (its rules and state) shared by a :class:`GameCoordinator`.
Each trained player is a :class:`PlayerEnv`: its ``initial_observation`` and ``step`` wait
until it is that player's turn (or the game is over), so the players of a game can be rolled
out concurrently like any other envs of a group. Players that are not trained (a frozen
model, a scripted opponent) are ``MessageCompleter``s: the coordinator plays their turns as
soon as they come up. Each player's reward is the game's final reward for that player.

If one player's env fails, the game is aborted and the other players' envs fail too, instead
of waiting for a turn that never comes.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Mapping

import tinker
from tinker_cookbook.completers import MessageCompleter, StopCondition
from tinker_cookbook.renderers import Message, Renderer
from tinker_cookbook.rl.types import Action, Env, Observation, StepResult


class TurnBasedGame(ABC):
    """The rules and state of one game of players ``0 .. n-1`` who move one at a time. Every
    trained player must get at least one turn (an RL episode has at least one action)."""

    @abstractmethod
    def current_player(self) -> int:
        """Whose turn it is (ignored once the game is over)."""

    @abstractmethod
    def messages(self, player: int) -> list[Message]:
        """What ``player`` sees before its move: the conversation to continue."""

    @abstractmethod
    def play(self, player: int, reply: str) -> None:
        """Apply ``player``'s reply. Bad moves are the game's to handle (penalise, replace), never
        an exception."""

    @abstractmethod
    def is_over(self) -> bool: ...

    @abstractmethod
    def reward(self, player: int) -> float:
        """``player``'s final reward (called once the game is over)."""

    def metrics(self, player: int) -> dict[str, float]:
        """``player``'s episode metrics (reported as ``env/all/<key>``)."""
        return {}


class GameAborted(RuntimeError):
    """Another player's env failed, so this game cannot go on."""


class GameCoordinator:
    """Runs one game: trained players wait for their turns, ``frozen`` players move at once."""

    def __init__(self, game: TurnBasedGame, frozen: Mapping[int, MessageCompleter] | None = None) -> None:
        self.game = game
        self.frozen = dict(frozen or {})
        self._changed = asyncio.Condition()
        self._aborted = False
        self._started = False

    async def wait_for_turn(self, player: int) -> None:
        """Return when it is ``player``'s turn or the game is over."""
        async with self._changed:
            if not self._started:  # the first player may be a frozen one
                self._started = True
                await self._play_frozen_turns()
            await self._changed.wait_for(lambda: self._aborted or self.game.is_over() or self.game.current_player() == player)
        if self._aborted:
            raise GameAborted("another player of this game failed")

    async def move(self, player: int, reply: str) -> None:
        """Play ``player``'s reply, then the frozen players' turns that follow it."""
        async with self._changed:
            try:
                if self._aborted:
                    raise GameAborted("another player of this game failed")
                self.game.play(player, reply)
                await self._play_frozen_turns()
            except BaseException:
                self._aborted = True
                raise
            finally:
                self._changed.notify_all()

    async def _play_frozen_turns(self) -> None:
        while not self.game.is_over() and (p := self.game.current_player()) in self.frozen:
            message = await self.frozen[p](self.game.messages(p))
            self.game.play(p, message["content"])


class PlayerEnv(Env):
    """One trained player of a coordinated game, as an RL episode: one step per own turn."""

    def __init__(self, coordinator: GameCoordinator, player: int, renderer: Renderer) -> None:
        self.coordinator = coordinator
        self.player = player
        self.renderer = renderer

    def _observation(self) -> tuple[Observation, StopCondition]:
        prompt = self.renderer.build_generation_prompt(self.coordinator.game.messages(self.player))
        return prompt, self.renderer.get_stop_sequences()

    async def initial_observation(self) -> tuple[Observation, StopCondition]:
        await self.coordinator.wait_for_turn(self.player)
        if self.coordinator.game.is_over():
            raise GameAborted(f"player {self.player}: the game ended before its first turn")
        return self._observation()

    async def step(self, action: Action) -> StepResult:
        message, _ = self.renderer.parse_response(action)
        await self.coordinator.move(self.player, message["content"])
        await self.coordinator.wait_for_turn(self.player)
        game = self.coordinator.game
        if game.is_over():
            return StepResult(game.reward(self.player), True, tinker.ModelInput.empty(), [], game.metrics(self.player))
        return StepResult(0.0, False, *self._observation())

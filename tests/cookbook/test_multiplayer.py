"""Multi-agent games: the rules, the turn coordination (scripted players, concurrent rollouts)
and, on the tiny model, each recipe's reward rising in a seeded run."""

from __future__ import annotations

import asyncio
import importlib

import numpy as np
import pytest

from tinker_cookbook.completers import TokensWithLogprobs
from tinker_cookbook.multiplayer_rl.coordinator import GameAborted, GameCoordinator, PlayerEnv
from tinker_cookbook.multiplayer_rl.guess_number import GuessNumberGame, GuessNumberGroupBuilder
from tinker_cookbook.multiplayer_rl.tic_tac_toe import SelfPlayGroupBuilder, TicTacToeGame
from tinker_cookbook.multiplayer_rl.twenty_questions import (
    TwentyQuestionsGame,
    TwentyQuestionsGroupBuilder,
    question_score,
)
from tinker_cookbook.renderers import Message, get_renderer
from tinker_cookbook.rl import train
from tinker_cookbook.rl.rollouts import do_group_rollout, do_single_rollout
from tinker_cookbook.utils.cli import parse_cli
from tinker_cookbook.utils.plotting import read_metrics

from .conftest import TINY


@pytest.fixture
def renderer(tiny_tokenizer):
    return get_renderer("chatml", tiny_tokenizer)


class ScriptedPolicy:
    """Replies with ``reply(prompt_text)``, tokenized and ended with the stop token."""

    def __init__(self, renderer, reply) -> None:
        self.renderer, self.reply = renderer, reply
        self.prompts: list[str] = []

    async def __call__(self, model_input, stop):
        text = self.renderer.tokenizer.decode(model_input.to_ints())
        self.prompts.append(text)
        await asyncio.sleep(0)  # let the other players run, as a real sampler would
        tokens = [*self.renderer.encode(self.reply(text)), stop[0]]
        return TokensWithLogprobs(tokens, [-1.0] * len(tokens))


def test_guess_number_answers_higher_lower_and_scores(renderer):
    game = GuessNumberGame(secret=13, low=1, high=20, max_turns=4)
    replies = iter(["10", "maybe fifteen", "15", "13"])
    policy = ScriptedPolicy(renderer, lambda _: next(replies))
    trajectory = asyncio.run(do_single_rollout(policy, PlayerEnv(GameCoordinator(game), 0, renderer)))  # type: ignore[arg-type]
    assert [m["content"] for m in game.history if m["role"] == "user"] == [
        "Higher.", "Reply with a number from 1 to 20.", "Lower.", "Correct!",
    ]
    assert "Higher." in policy.prompts[1] and "Lower." in policy.prompts[3]
    assert [t.reward for t in trajectory.transitions] == [0.0, 0.0, 0.0, 1.0]
    assert trajectory.transitions[-1].metrics == {"solved": 1.0, "valid_guesses": 0.75, "guesses": 4.0}
    unsolved = GuessNumberGame(secret=13, low=1, high=21, max_turns=2)
    unsolved.play(0, "3")
    unsolved.play(0, "no idea")
    assert unsolved.is_over() and unsolved.reward(0) == pytest.approx(0.5 * (1 - 10 / 20))  # closeness of 3


def test_tic_tac_toe_rules():
    game = TicTacToeGame(seed=0)
    for player, move in [(0, "5"), (1, "1"), (0, "3"), (1, "9"), (0, "cell 7")]:  # X: 5, 3, 7 is a diagonal
        assert game.current_player() == player
        game.play(player, move)
    assert game.is_over() and game.winner() == 0
    assert (game.reward(0), game.reward(1)) == (1.0 + 0.5, -1.0 + 0.5)  # outcome + move_bonus * all legal
    illegal = TicTacToeGame(seed=0, move_bonus=0.5)
    illegal.play(0, "5")
    illegal.play(1, "5")  # taken: a random free cell is played instead, and scored 0.5 (a number)
    assert illegal.board.count(1) == 1 and illegal.board[4] == 0 and illegal.scores == ([1.0], [0.5])
    assert illegal.render_board().splitlines()[1] == "4 | X | 6" and illegal.render_board().count("O") == 1
    assert illegal.messages(1)[0]["content"].startswith("You play tic-tac-toe as O.")
    illegal.play(0, "no idea")  # no number: scored 0, and X forfeits too
    assert illegal.scores[0] == [1.0, 0.0] and illegal.board.count(0) == 2


def test_tic_tac_toe_illegal_move_forfeits():
    game = TicTacToeGame(seed=0, move_bonus=0.5)
    # O's "1" is taken: O forfeits. X later wins on the board too; O would have won nothing anyway.
    for player, move in [(0, "1"), (1, "1"), (0, "5")]:
        game.play(player, move)
    o_cell = game.board.index(1)
    while not game.is_over():
        free = game.free_cells()
        game.play(game.current_player(), str(free[0] + 1))
    assert game.outcome(1) == -1.0 and game.outcome(0) == 1.0  # whatever the board says
    assert game.reward(1) == pytest.approx(-1.0 + 0.5 * np.mean(game.scores[1])) and game.scores[1][0] == 0.5
    assert o_cell != 0 and game.metrics(1)["illegal"] == pytest.approx(1 / len(game.scores[1]))
    both = TicTacToeGame(seed=1)
    for player, move in [(0, "x"), (1, "42")]:
        both.play(player, move)
    assert both.outcome(0) == both.outcome(1) == -1.0  # both forfeited: both lose


def test_self_play_group_coordinates_both_players(renderer):
    def first_free(prompt: str) -> str:  # the board is the last user message of the prompt
        board = prompt.rsplit("user\n", 1)[1]
        return next(c for c in "123456789" if c in board)

    policy = ScriptedPolicy(renderer, first_free)
    group = asyncio.run(do_group_rollout(SelfPlayGroupBuilder(renderer, games_per_group=2, seed=0), policy))  # type: ignore[arg-type]
    assert group.errors == [] and len(group.trajectories_G) == 4  # X and O of two games
    # X takes 1, O 2, X 3, O 4, X 5, O 6, X 7: X wins on the 3-5-7 diagonal with 4 moves to O's 3.
    assert group.get_total_rewards() == [1.5, -0.5, 1.5, -0.5]  # outcome + 0.5 for all-legal moves
    assert [len(t.transitions) for t in group.trajectories_G] == [4, 3, 4, 3]
    assert all(m["illegal"] == 0.0 for m in group.metrics_G)


class ScriptedAnswerer:
    def __init__(self) -> None:
        self.seen: list[list[Message]] = []

    async def __call__(self, messages):
        self.seen.append(messages)
        return Message(role="assistant", content="yes, it does" if "bark" in messages[-1]["content"] else "No")


def test_twenty_questions_frozen_answerer_sees_secret_and_question(renderer):
    answerer = ScriptedAnswerer()
    replies = iter(["Does it bark?", "Is it big", "Is it a dog?"])
    policy = ScriptedPolicy(renderer, lambda _: next(replies))
    group = asyncio.run(do_group_rollout(TwentyQuestionsGroupBuilder(renderer, answerer, "dog", 1, 4, 0.2), policy))  # type: ignore[arg-type]
    assert group.errors == []
    assert [m[-1]["content"] for m in answerer.seen] == ["Does it bark?", "Is it big"]
    assert all("The secret animal is: dog." in m[0]["content"] for m in answerer.seen)
    assert "Yes." in policy.prompts[1] and "No." in policy.prompts[2]  # the asker sees the answers, not the secret
    assert all("secret animal is" not in p for p in policy.prompts)
    assert "cat, dog, horse" in policy.prompts[0]  # the candidates are listed
    assert group.get_total_rewards() == [pytest.approx(1.0 + 0.2 * (1 + 0.5 + 1) / 3)]
    game = TwentyQuestionsGame("cat", max_questions=2, question_bonus=0.2)
    game.play(0, "Is it red?")
    game.play(1, "No")
    assert not game.is_over()
    game.play(0, "Is it blue?")
    assert not game.is_over()  # the last question still gets its answer
    game.play(1, "No")
    assert game.is_over() and game.reward(0) == pytest.approx(0.2)


def test_twenty_questions_solves_only_on_the_secret_alone():
    def solved(question: str) -> bool:
        game = TwentyQuestionsGame("cat", max_questions=4, question_bonus=0.2)
        game.play(0, question)
        return game.solved()

    assert solved("Is it a cat?") and solved("CAT")
    assert not solved("Is it a cat, a dog or a cow?")  # listing animals does not win
    assert not solved("Can it catch mice?")  # a word, not a substring
    assert [question_score(q) for q in ["Does it bark?", "Does it bark", "It barks?", "bark"]] == [1.0, 0.5, 0.5, 0.0]


class CrashingAnswerer:
    async def __call__(self, messages):
        raise RuntimeError("answerer down")


def test_a_failing_player_aborts_the_game_instead_of_hanging(renderer):
    policy = ScriptedPolicy(renderer, lambda _: "Is it a cat?")
    builder = TwentyQuestionsGroupBuilder(renderer, CrashingAnswerer(), "dog", 2, 4, 0.2)  # type: ignore[arg-type]
    group = asyncio.run(asyncio.wait_for(do_group_rollout(builder, policy), 10))  # type: ignore[arg-type]
    assert group.trajectories_G == [] and [e.error_type for e in group.errors] == ["RuntimeError", "RuntimeError"]

    coordinator = GameCoordinator(TicTacToeGame(seed=0))
    game_o = PlayerEnv(coordinator, 1, renderer)

    async def o_waits_while_x_fails():
        waiting = asyncio.ensure_future(game_o.initial_observation())
        await asyncio.sleep(0)
        with pytest.raises(TypeError):
            await coordinator.move(0, None)  # type: ignore[arg-type]  # a bug in a player's env
        with pytest.raises(GameAborted):
            await asyncio.wait_for(waiting, 5)

    asyncio.run(o_waits_while_x_fails())


def test_guess_number_group_members_share_the_secret(renderer):
    envs = asyncio.run(GuessNumberGroupBuilder(renderer, secret=7, group_size=3).make_envs())
    assert {e.coordinator.game.secret for e in envs} == {7} and len({id(e.coordinator) for e in envs}) == 3  # type: ignore[attr-defined]


# --- learning on the tiny model (seeded: the bounds come from one measured run each) ----------


def recipe_rewards(tmp_path, recipe, args: list[str]) -> tuple[list[float], list[dict]]:
    module = importlib.import_module(f"tinker_cookbook.recipes.multiplayer_rl.{recipe}")
    cli = parse_cli(module.CLIConfig, [f"log_path={tmp_path}", f"model_name={TINY}", "lora_rank=8", *args])
    asyncio.run(train.main(module.build_config(cli)))
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "reward/total" in r]
    return [r["reward/total"] for r in rows], rows


@pytest.mark.slow
@pytest.mark.timeout(600)  # 12 two-turn RL steps: est. 90-300 s loaded
def test_guess_number_reward_rises(tmp_path, embedded):
    r, rows = recipe_rewards(tmp_path, "guess_number", ["max_steps=12", "learning_rate=2e-2", "max_tokens=4", "max_turns=2"])
    assert len(r) == 12
    assert np.mean(r[:3]) < 0.1, r  # measured 0.058
    assert np.mean(r[-2:]) > 0.15, r  # measured 0.261 (the policy starts answering with numbers)
    assert rows[-1]["env/all/valid_guesses"] > 0.5  # measured 0.73, from 0.30


@pytest.mark.slow
@pytest.mark.timeout(900)  # 12 self-play steps: 28 s measured at load 2.5, 624 s at load 12
def test_tic_tac_toe_reward_rises(tmp_path, embedded):
    """Self-play, both sides the same policy. On the random tiny model no side ever plays a whole
    game legally (no win), so the rise is the move-score shaping: numbers first, then free cells."""
    r, rows = recipe_rewards(tmp_path, "tic_tac_toe",
                             ["max_steps=12", "batch_size=2", "games_per_group=4", "max_tokens=3", "learning_rate=2e-2"])
    assert len(r) == 12 and all(row["rollout/errors"] == 0 for row in rows)
    assert np.mean(r[:3]) < -0.88, r  # measured -0.937 (-1 outcome + 0.5 * mean move score 0.13)
    assert np.mean(r[-2:]) > -0.82, r  # measured -0.720 (takeoff at step 6: -0.859)
    illegal = [row["env/all/illegal"] for row in rows]
    assert np.mean(illegal[-2:]) < 0.95, illegal  # measured 0.875, from 0.98 in the first 3 steps


@pytest.mark.slow
@pytest.mark.timeout(900)  # 8 steps of 32 games: 12 s measured at load 2.5, 600 s at load 12
def test_twenty_questions_reward_rises(tmp_path, embedded):
    """The random tiny model does not name the secret; the rise is the question-score shaping (a
    yes/no question word). The answerer is the frozen tiny base model."""
    r, rows = recipe_rewards(tmp_path, "twenty_questions", ["max_steps=8", "batch_size=4", "group_size=8",
                                                             "max_questions=2", "max_tokens=12", "learning_rate=2e-2"])
    assert len(r) == 8 and all(row["rollout/errors"] == 0 and row["env/all/turns"] == 2 for row in rows)
    assert np.mean(r[:3]) < 0.02, r  # measured 0.0073
    assert np.mean(r[-2:]) > 0.04, r  # measured 0.081 (0.061, 0.100; takeoff at step 5: 0.039)
    score = [row["env/all/question_score"] for row in rows]
    assert np.mean(score[-2:]) > 0.2, score  # measured 0.40 (0.30, 0.50), from 0.03 in the first 3 steps

"""Per-run history: the store's table (bounded, deleted with its run) and what ``RunHistory``
makes of a run's answers, on a real SQLite file."""

from __future__ import annotations

import sqlite3

import pytest

from tinker import wire
from tinker.types import AdamParams, Datum, ForwardBackwardOutput, ModelInput, OptimStepResponse
from tinker_backend.history import RunHistory
from tinker_backend.store import HistoryPoint, RunRecord, Store, now_iso


def point(run_id: str, step: int) -> HistoryPoint:
    return HistoryPoint(run_id, step, float(step), 1.0, 1.0, 10, 10 * step, 1e-3, 0.5, 0.1, 0.05, 0)


def add_run(store: Store, run_id: str) -> None:
    store.add_run(RunRecord(run_id, "s", "owner", "tiny-llama", {"rank": 4}, now_iso(), now_iso(), {}))


def test_history_is_thinned_past_its_cap_keeping_the_newest(tmp_path):
    store = Store(tmp_path / "db.sqlite3")
    for step in range(1, 26):
        store.add_history(point("r", step), max_points=10)
    steps = [p.step for p in store.history("r")]
    assert len(steps) <= 10 and steps[-1] == 25 and steps == sorted(steps)
    assert steps[0] <= 5  # thinned over the whole run, not cut to its end
    assert store.last_history(["r"])["r"].tokens_total == 250  # the total survives thinning
    assert [p.step for p in store.history("r", after_step=20)] == [s for s in steps if s > 20]


def test_history_is_deleted_with_its_run(tmp_path):
    path = tmp_path / "db.sqlite3"
    store = Store(path)
    for run_id in ("a", "b"):
        add_run(store, run_id)
        store.add_history(point(run_id, 1), max_points=10)
    with sqlite3.connect(path) as db:  # however a run row goes, its history goes with it
        db.execute("DELETE FROM runs WHERE run_id = 'a'")
    assert store.history("a") == [] and len(store.history("b")) == 1


def datum(n: int, weights: list[float] | None) -> Datum:
    inputs: dict = {"target_tokens": list(range(1, n + 1))}
    if weights is not None:
        inputs["weights"] = weights
    return Datum(model_input=ModelInput.from_ints(list(range(n))), loss_fn_inputs=inputs)


def fb_answer(loss: float, cycle_s: float) -> ForwardBackwardOutput:
    return ForwardBackwardOutput("cross_entropy", [], {"loss:sum": loss, "cycle_seconds:max": cycle_s})


def test_a_step_adds_up_its_forward_backwards_and_closes_on_optim_step(tmp_path):
    store = Store(tmp_path / "db.sqlite3")
    history = RunHistory(store)
    first = [datum(4, [0.0, 1.0, 1.0, 1.0]), datum(3, None)]
    second = [datum(5, [0.5] * 5)]
    history.answered("r", wire.ForwardBackward("r", 1, first, "cross_entropy"), fb_answer(2.5, 0.25), 100.0)
    history.answered("r", wire.ForwardBackward("r", 2, second, "cross_entropy"), fb_answer(1.5, 0.5), 101.0)
    history.answered("r", wire.ForwardBackward("r", 3, second, "cross_entropy", forward_only=True), fb_answer(9.0, 1), 102.0)
    history.sampled("r", 7)
    adam = AdamParams(learning_rate=3e-4)
    history.answered("r", wire.OptimStep("r", 4, adam), OptimStepResponse({"grad_norm:max": 1.25, "learning_rate:max": 3e-4}), 103.0)
    history.answered("r", wire.ForwardBackward("r", 5, second, "cross_entropy"), fb_answer(1.0, 0.5), 104.0)
    history.answered("r", wire.OptimStep("r", 6, adam), OptimStepResponse({"grad_norm:max": 0.75, "learning_rate:max": 3e-4}), 105.0)

    one, two = store.history("r")
    assert (one.step, two.step) == (1, 2)
    assert one.loss_sum == 4.0  # the pure forward is not training
    assert one.weight_sum == 3.0 + 3.0 + 2.5  # weights where given, else one per target
    assert one.tokens == 4 + 3 + 5 and one.tokens_total == 12
    assert (one.learning_rate, one.grad_norm, one.cycle_seconds, one.sampled_tokens) == (3e-4, 1.25, 0.75, 7)
    assert two.loss_sum == 1.0 and two.tokens_total == 17 and two.sampled_tokens == 0 and two.grad_norm == 0.75
    # A step's time runs from its first request's arrival (not from the previous step's answer).
    assert (one.step_seconds, two.step_seconds) == (pytest.approx(one.at - 100.0), pytest.approx(two.at - 104.0))

    again = RunHistory(store)  # a restarted server goes on after the stored steps
    again.answered("r", wire.OptimStep("r", 7, adam), OptimStepResponse({"grad_norm:max": 0.5}), 106.0)
    assert [(p.step, p.tokens_total, p.loss_sum) for p in store.history("r", after_step=2)] == [(3, 17, None)]


@pytest.mark.parametrize("weights", [None, [1.0, 0.0]])
def test_weights_decide_the_loss_per_token_denominator(tmp_path, weights):
    history = RunHistory(Store(tmp_path / "db.sqlite3"))
    history.answered("r", wire.ForwardBackward("r", 1, [datum(2, weights)], "cross_entropy"), fb_answer(3.0, 0), 1.0)
    history.answered("r", wire.OptimStep("r", 2, AdamParams()), OptimStepResponse({}), 2.0)
    (only,) = history.store.history("r")
    assert only.weight_sum == (2.0 if weights is None else 1.0)
    assert (only.learning_rate, only.grad_norm) == (None, None)

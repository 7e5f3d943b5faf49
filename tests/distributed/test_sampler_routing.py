"""The routing policy of sampler replicas (``workers.routing``): affinity, spill-over, liveness."""

from __future__ import annotations

import pytest

from tinker_backend.workers.routing import ReplicaLoad, choose_replica


def replica(in_flight: int = 0, adapters: tuple[str, ...] = (), alive: bool = True) -> ReplicaLoad:
    return ReplicaLoad(alive, in_flight, frozenset(adapters))


def test_the_replica_holding_the_adapter_wins_while_not_overloaded() -> None:
    replicas = [replica(0), replica(3, ("s",))]
    assert choose_replica("s", replicas, max_in_flight=4) == 1  # busier, but it holds "s"
    replicas = [replica(0), replica(4, ("s",))]
    assert choose_replica("s", replicas, max_in_flight=4) == 0  # at the threshold: spill over


def test_spill_over_goes_to_the_least_loaded_replica() -> None:
    replicas = [replica(5, ("s",)), replica(2), replica(1), replica(1)]
    assert choose_replica("s", replicas, max_in_flight=5) == 2  # least loaded, lowest index on ties


def test_the_least_loaded_holder_of_several() -> None:
    replicas = [replica(3, ("s",)), replica(0), replica(1, ("s",))]
    assert choose_replica("s", replicas, max_in_flight=8) == 2


def test_an_overloaded_holder_still_serves_when_every_replica_is_busier() -> None:
    replicas = [replica(9, ("s",)), replica(10)]
    assert choose_replica("s", replicas, max_in_flight=8) == 0


@pytest.mark.parametrize("sampler_id", [None, "unknown"])
def test_the_base_model_and_unheld_adapters_go_to_the_least_loaded(sampler_id: str | None) -> None:
    replicas = [replica(2, ("s",)), replica(1), replica(1)]
    assert choose_replica(sampler_id, replicas) == 1


def test_dead_replicas_are_skipped() -> None:
    replicas = [replica(0, ("s",), alive=False), replica(7)]
    assert choose_replica("s", replicas) == 1
    assert choose_replica("s", [replica(alive=False), replica(alive=False)]) is None
    assert choose_replica(None, []) is None

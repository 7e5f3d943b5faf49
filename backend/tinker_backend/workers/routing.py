"""Which sampler replica serves a sample request: adapter affinity with load balance.

Pure policy, no processes: ``choose_replica`` sees each replica's state and returns an index.

Semantics (for a request of ``sampler_id``, None meaning the base model alone)::

    alive = [r for r in replicas if r.alive]
    holders = [r for r in alive if sampler_id in r.adapters]
    best = least loaded of holders (lowest index on ties)
    if best exists and best.in_flight < max_in_flight: return best      # affinity
    return least loaded of alive (lowest index on ties)                 # spill-over: it loads the adapter

Affinity saves loading an adapter version again (a read of its PEFT folder); the threshold stops
one hot adapter from queueing on one replica while others are idle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# In-flight sample requests at which a replica holding the adapter counts as overloaded. The
# torch sampler batches continuously, so a replica takes a few requests at little extra cost per
# step; past this many, a second replica (which first loads the adapter) answers sooner.
DEFAULT_MAX_IN_FLIGHT = 8


@dataclass(frozen=True)
class ReplicaLoad:
    """What routing sees of one replica."""

    alive: bool
    in_flight: int
    adapters: frozenset[str]


def choose_replica(
    sampler_id: str | None, replicas: Sequence[ReplicaLoad], max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
) -> int | None:
    """The index of the replica for a request of ``sampler_id`` (see the module docstring), or
    None when no replica is alive."""
    alive = [i for i, r in enumerate(replicas) if r.alive]
    if not alive:
        return None
    holders = [i for i in alive if sampler_id is not None and sampler_id in replicas[i].adapters]
    if holders:
        best = min(holders, key=lambda i: (replicas[i].in_flight, i))
        if replicas[best].in_flight < max_in_flight:
            return best
    return min(alive, key=lambda i: (replicas[i].in_flight, i))

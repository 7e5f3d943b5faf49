"""Sessions as the Tinker HTTP protocol sees them: heartbeats, finish, and what each one made.

The backend's store records that a session exists; this module adds the protocol's view, in
memory, for the sessions created through ``/api/v1`` since the server started: when each
last sent a heartbeat, whether it finished, and the training runs and samplers it created
(for ``GET /api/v1/sessions/{id}``).

TODO(issue 6): expire sessions whose heartbeats stop and free their runs and samplers; this
module already knows ``last_heartbeat``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tinker_backend.errors import ServiceError


@dataclass
class Session:
    owner: str
    user_metadata: dict[str, str]
    display_name: str | None
    last_heartbeat: float = field(default_factory=time.monotonic)
    finished: bool = False
    training_run_ids: list[str] = field(default_factory=list)
    sampler_ids: list[str] = field(default_factory=list)


class Sessions:
    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}  # in creation order

    def add(self, session_id: str, session: Session) -> None:
        self._sessions[session_id] = session

    def get(self, session_id: str, owner: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise ServiceError(404, f"session_id: unknown session {session_id!r}")
        return session

    def list(self, owner: str) -> list[str]:
        """The owner's session ids, newest first."""
        return [sid for sid, s in reversed(self._sessions.items()) if s.owner == owner]

    def heartbeat(self, session_id: str, owner: str) -> None:
        session = self.get(session_id, owner)
        if session.finished:
            raise ServiceError(410, f"session_id: session {session_id!r} has finished")
        session.last_heartbeat = time.monotonic()

    def record_run(self, model_id: str, owner: str) -> None:
        self._record(model_id.split(":train:")[0], owner).training_run_ids.append(model_id)

    def record_sampler(self, sampler_id: str, owner: str) -> None:
        self._record(sampler_id.split(":sample:")[0], owner).sampler_ids.append(sampler_id)

    def _record(self, session_id: str, owner: str) -> Session:
        # A session created over the native protocol is unknown here until it is used here.
        return self._sessions.setdefault(session_id, Session(owner, {}, None))

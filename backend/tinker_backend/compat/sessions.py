"""Sessions as the Tinker HTTP protocol sees them: finished or not, and what each one made.

The backend keeps sessions alive (heartbeats) and expires them; this module adds, in memory
and for the sessions used through ``/api/v1`` since the server started, whether the client
finished it (a heartbeat after that is a 410, which stops the SDK's heartbeat loop) and the
training runs and samplers it created (for ``GET /api/v1/sessions/{id}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tinker_backend.errors import ServiceError


@dataclass
class Session:
    owner: str
    user_metadata: dict[str, str]
    display_name: str | None
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

    def finished(self, session_id: str, owner: str) -> bool:
        session = self._sessions.get(session_id)
        return session is not None and session.owner == owner and session.finished

    def list(self, owner: str) -> list[str]:
        """The owner's session ids, newest first."""
        return [sid for sid, s in reversed(self._sessions.items()) if s.owner == owner]

    def record_run(self, model_id: str, owner: str) -> None:
        self._record(model_id.split(":train:")[0], owner).training_run_ids.append(model_id)

    def record_sampler(self, sampler_id: str, owner: str) -> None:
        self._record(sampler_id.split(":sample:")[0], owner).sampler_ids.append(sampler_id)

    def _record(self, session_id: str, owner: str) -> Session:
        # A session created over the native protocol is unknown here until it is used here.
        return self._sessions.setdefault(session_id, Session(owner, {}, None))

"""What the Tinker HTTP protocol adds to a session, in memory, for the sessions created through
``/api/v1`` since the server started: its display name, and whether the client finished it (a
heartbeat after that is a 410, which stops the SDK's heartbeat loop). The store keeps the rest
(owner, metadata, runs, samplers: ``GET /api/v1/sessions/{id}`` answers from it).
"""

from __future__ import annotations

from dataclasses import dataclass

from tinker_backend.errors import ServiceError


@dataclass
class Session:
    owner: str
    display_name: str | None
    finished: bool = False


class Sessions:
    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

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

    def display_name(self, session_id: str, owner: str) -> str | None:
        session = self._sessions.get(session_id)
        return session.display_name if session is not None and session.owner == owner else None

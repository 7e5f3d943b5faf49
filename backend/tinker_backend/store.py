"""The durable record of sessions, runs, samplers and checkpoints: SQLite in WAL mode.

Checkpoint *files* live under ``<data_dir>/checkpoints``; this store only indexes them. Every
method is a short transaction, called from the event-loop thread.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import msgspec

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at TEXT NOT NULL,
    user_metadata TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    base_model TEXT NOT NULL,
    lora_config TEXT NOT NULL,
    created_at TEXT NOT NULL,
    last_request_time TEXT NOT NULL,
    user_metadata TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS samplers (
    sampler_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    base_model TEXT NOT NULL,
    model_path TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    directory TEXT NOT NULL,
    created_at TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    expires_at TEXT,
    PRIMARY KEY (run_id, kind, name)
);
"""


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


class RunRecord(msgspec.Struct):
    run_id: str
    session_id: str
    owner: str
    base_model: str
    lora_config: dict[str, Any]
    created_at: str
    last_request_time: str
    user_metadata: dict[str, str]


class CheckpointRecord(msgspec.Struct):
    run_id: str
    kind: str
    name: str
    owner: str
    directory: str
    created_at: str
    size_bytes: int
    expires_at: str | None

    @property
    def tinker_path(self) -> str:
        return f"tinker://{self.run_id}/{self.kind}/{self.name}"


class SamplerRecord(msgspec.Struct):
    sampler_id: str
    session_id: str
    owner: str
    base_model: str
    model_path: str | None
    created_at: str


class Store:
    """Sessions, runs, samplers and the checkpoint index of one data dir."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- sessions ---

    def add_session(self, session_id: str, owner: str, user_metadata: dict[str, str]) -> None:
        self._execute(
            "INSERT OR IGNORE INTO sessions VALUES (?, ?, ?, ?)",
            (session_id, owner, now_iso(), json.dumps(user_metadata)),
        )

    def session_owner(self, session_id: str) -> str | None:
        rows = self._execute("SELECT owner FROM sessions WHERE session_id = ?", (session_id,))
        return rows[0]["owner"] if rows else None

    # --- runs ---

    def add_run(self, record: RunRecord) -> None:
        self._execute(
            "INSERT OR IGNORE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.run_id,
                record.session_id,
                record.owner,
                record.base_model,
                json.dumps(record.lora_config),
                record.created_at,
                record.last_request_time,
                json.dumps(record.user_metadata),
            ),
        )

    def get_run(self, run_id: str) -> RunRecord | None:
        rows = self._execute("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        return _run(rows[0]) if rows else None

    def list_runs(self, owner: str, limit: int, offset: int) -> tuple[list[RunRecord], int]:
        rows = self._execute(
            "SELECT * FROM runs WHERE owner = ? ORDER BY created_at DESC LIMIT ? OFFSET ?", (owner, limit, offset)
        )
        total = self._execute("SELECT COUNT(*) AS n FROM runs WHERE owner = ?", (owner,))[0]["n"]
        return [_run(r) for r in rows], total

    def touch_run(self, run_id: str) -> None:
        self._execute("UPDATE runs SET last_request_time = ? WHERE run_id = ?", (now_iso(), run_id))

    # --- samplers ---

    def add_sampler(self, record: SamplerRecord) -> None:
        self._execute(
            "INSERT OR IGNORE INTO samplers VALUES (?, ?, ?, ?, ?, ?)",
            (record.sampler_id, record.session_id, record.owner, record.base_model, record.model_path, record.created_at),
        )

    def get_sampler(self, sampler_id: str) -> SamplerRecord | None:
        rows = self._execute("SELECT * FROM samplers WHERE sampler_id = ?", (sampler_id,))
        return SamplerRecord(**dict(rows[0])) if rows else None

    # --- checkpoints ---

    def put_checkpoint(self, record: CheckpointRecord) -> None:
        self._execute(
            "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.run_id,
                record.kind,
                record.name,
                record.owner,
                record.directory,
                record.created_at,
                record.size_bytes,
                record.expires_at,
            ),
        )

    def get_checkpoint(self, run_id: str, kind: str, name: str) -> CheckpointRecord | None:
        rows = self._execute(
            "SELECT * FROM checkpoints WHERE run_id = ? AND kind = ? AND name = ?", (run_id, kind, name)
        )
        return CheckpointRecord(**dict(rows[0])) if rows else None

    def list_checkpoints(self, run_id: str) -> list[CheckpointRecord]:
        rows = self._execute("SELECT * FROM checkpoints WHERE run_id = ? ORDER BY created_at", (run_id,))
        return [CheckpointRecord(**dict(r)) for r in rows]

    def list_user_checkpoints(self, owner: str, limit: int, offset: int) -> tuple[list[CheckpointRecord], int]:
        rows = self._execute(
            "SELECT * FROM checkpoints WHERE owner = ? ORDER BY created_at DESC LIMIT ? OFFSET ?",
            (owner, limit, offset),
        )
        total = self._execute("SELECT COUNT(*) AS n FROM checkpoints WHERE owner = ?", (owner,))[0]["n"]
        return [CheckpointRecord(**dict(r)) for r in rows], total

    def delete_checkpoint(self, run_id: str, kind: str, name: str) -> None:
        self._execute("DELETE FROM checkpoints WHERE run_id = ? AND kind = ? AND name = ?", (run_id, kind, name))


def _run(row: sqlite3.Row) -> RunRecord:
    data = dict(row)
    data["lora_config"] = json.loads(data["lora_config"])
    data["user_metadata"] = json.loads(data["user_metadata"])
    return RunRecord(**data)

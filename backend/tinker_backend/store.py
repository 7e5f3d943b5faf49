"""The durable record of one data dir: SQLite in WAL mode.

Tables: ``api_keys`` (hashes only), ``sessions``, ``runs``, ``samplers``, ``checkpoints`` (an
index: the files live under ``<data_dir>/checkpoints``), ``futures`` (requests of the HTTP
protocol, so that one in flight when the server died is answered "lost" after a restart) and
``run_history`` (one row per optimizer step of a run, see ``history.py``; deleted with its run).

What makes a run resumable after a restart (see ``docs/operations.md``): each checkpoint row
keeps the ``seq_id`` of the save that wrote it, and each run keeps ``last_seq`` (the highest
``seq_id`` answered) and ``last_mutation_seq`` (the highest answered request that changed the
adapter: a forward_backward, an optim_step or a load). Both are written *before* the answer
leaves the server.

Every method is one short transaction. The store is shared by the event loop and the compute
threads (a save indexes its checkpoint from the compute thread), hence the lock; other
processes (``tinker-server keys ...``) may open the same file at the same time.
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
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
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
CREATE TABLE IF NOT EXISTS futures (
    request_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at TEXT NOT NULL,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS run_history (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    at REAL NOT NULL,
    loss_sum REAL,
    weight_sum REAL NOT NULL,
    tokens INTEGER NOT NULL,
    tokens_total INTEGER NOT NULL,
    learning_rate REAL,
    grad_norm REAL,
    step_seconds REAL,
    cycle_seconds REAL NOT NULL,
    sampled_tokens INTEGER NOT NULL,
    PRIMARY KEY (run_id, step)
);
CREATE TRIGGER IF NOT EXISTS run_history_goes_with_run AFTER DELETE ON runs
BEGIN DELETE FROM run_history WHERE run_id = OLD.run_id; END;
CREATE INDEX IF NOT EXISTS runs_by_owner ON runs (owner, created_at);
CREATE INDEX IF NOT EXISTS checkpoints_by_owner ON checkpoints (owner, created_at);
"""

# Columns added after the first release, with their definitions: added to older data dirs
# on open (SQLite's ALTER TABLE ADD COLUMN keeps existing rows, filled with the default).
_ADDED_COLUMNS = {
    "runs": {
        "last_seq": "INTEGER NOT NULL DEFAULT 0",
        "last_mutation_seq": "INTEGER NOT NULL DEFAULT 0",
        "origin_path": "TEXT",
        "origin_with_optimizer": "INTEGER NOT NULL DEFAULT 0",
    },
    "checkpoints": {"seq_id": "INTEGER NOT NULL DEFAULT 0", "published": "INTEGER NOT NULL DEFAULT 0"},
}

# (last_request_time, seq_id, mutating, seq_id, run_id): an answer about to leave (record_answer).
_RECORD_ANSWER = (
    "UPDATE runs SET last_request_time = ?, last_seq = MAX(last_seq, ?),"
    " last_mutation_seq = CASE WHEN ? THEN MAX(last_mutation_seq, ?) ELSE last_mutation_seq END"
    " WHERE run_id = ?"
)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def iso_in(seconds: float) -> str:
    """The UTC time ``seconds`` from now, in the format of ``now_iso`` (so strings compare)."""
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).isoformat()


class RunRecord(msgspec.Struct):
    run_id: str
    session_id: str
    owner: str
    base_model: str
    lora_config: dict[str, Any]
    created_at: str
    last_request_time: str
    user_metadata: dict[str, str]
    last_seq: int = 0
    last_mutation_seq: int = 0
    origin_path: str | None = None  # the checkpoint a run created from state started from
    origin_with_optimizer: bool = False


class CheckpointRecord(msgspec.Struct):
    run_id: str
    kind: str
    name: str
    owner: str
    directory: str
    created_at: str
    size_bytes: int
    expires_at: str | None
    seq_id: int = 0  # the seq_id of the save that wrote it
    published: bool = False  # any API key may load or sample it (only the owner may change it)

    @property
    def tinker_path(self) -> str:
        return f"tinker://{self.run_id}/{self.kind}/{self.name}"


class SessionRecord(msgspec.Struct):
    session_id: str
    owner: str
    created_at: str
    user_metadata: dict[str, str]


class SamplerRecord(msgspec.Struct):
    sampler_id: str
    session_id: str
    owner: str
    base_model: str
    model_path: str | None
    created_at: str


class HistoryPoint(msgspec.Struct):
    """One optimizer step of a run: what its forward_backwards and its optim_step reported.

    ``loss_sum`` and ``weight_sum`` add up over the step's forward_backwards (the loss per
    token is their ratio); ``tokens_total`` counts the run's trained tokens up to this step (it
    survives thinning); ``learning_rate`` and ``grad_norm`` (before clipping) are the
    optim_step's; ``step_seconds`` runs from the arrival of the step's first request to the
    optim_step's answer; ``cycle_seconds`` adds up the clock cycles the step's
    forward_backwards were merged into; ``sampled_tokens`` counts tokens sampled from the
    run's snapshots and sampler checkpoints since the previous step. ``at`` is Unix time.
    """

    run_id: str
    step: int
    at: float
    loss_sum: float | None
    weight_sum: float
    tokens: int
    tokens_total: int
    learning_rate: float | None
    grad_norm: float | None
    step_seconds: float | None
    cycle_seconds: float
    sampled_tokens: int


class KeyRecord(msgspec.Struct):
    key_id: str
    key_hash: str
    owner: str
    created_at: str
    revoked_at: str | None


class Store:
    """Keys, sessions, runs, samplers, futures and the checkpoint index of one data dir."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives the process being killed (not a power cut).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        for table, columns in _ADDED_COLUMNS.items():
            present = {row["name"] for row in self._execute(f"PRAGMA table_info({table})")}
            for name, definition in columns.items():
                if name not in present:
                    self._execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- API keys ---

    def add_key(self, key_id: str, key_hash: str, owner: str) -> None:
        self._execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, NULL)", (key_id, key_hash, owner, now_iso()))

    def key_owner(self, key_hash: str) -> str | None:
        """The owner of a key that exists and is not revoked."""
        rows = self._execute(
            "SELECT owner FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (key_hash,)
        )
        return rows[0]["owner"] if rows else None

    def has_active_keys(self) -> bool:
        return bool(self._execute("SELECT 1 FROM api_keys WHERE revoked_at IS NULL LIMIT 1"))

    def list_keys(self) -> list[KeyRecord]:
        return [KeyRecord(**dict(r)) for r in self._execute("SELECT * FROM api_keys ORDER BY created_at")]

    def revoke_key(self, key_id: str) -> bool:
        """Revoke by key id; False if there is no such active key."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (now_iso(), key_id)
            )
            return cursor.rowcount > 0

    # --- sessions ---

    def add_session(self, session_id: str, owner: str, user_metadata: dict[str, str]) -> None:
        self._execute(
            "INSERT OR IGNORE INTO sessions VALUES (?, ?, ?, ?)",
            (session_id, owner, now_iso(), json.dumps(user_metadata)),
        )

    def session_owner(self, session_id: str) -> str | None:
        rows = self._execute("SELECT owner FROM sessions WHERE session_id = ?", (session_id,))
        return rows[0]["owner"] if rows else None

    def get_session(self, session_id: str) -> SessionRecord | None:
        rows = self._execute("SELECT * FROM sessions WHERE session_id = ?", (session_id,))
        if not rows:
            return None
        data = dict(rows[0])
        data["user_metadata"] = json.loads(data["user_metadata"])
        return SessionRecord(**data)

    def list_sessions(self, owner: str, limit: int, offset: int) -> list[str]:
        """The owner's session ids, newest first."""
        rows = self._execute(
            "SELECT session_id FROM sessions WHERE owner = ? ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
            (owner, limit, offset),
        )
        return [r["session_id"] for r in rows]

    def session_members(self, session_id: str) -> tuple[list[str], list[str]]:
        """The ids of the session's training runs and of its samplers, oldest first."""
        runs = self._execute("SELECT run_id FROM runs WHERE session_id = ? ORDER BY created_at", (session_id,))
        samplers = self._execute(
            "SELECT sampler_id FROM samplers WHERE session_id = ? ORDER BY created_at", (session_id,)
        )
        return [r["run_id"] for r in runs], [r["sampler_id"] for r in samplers]

    # --- runs ---

    def add_run(self, record: RunRecord) -> None:
        self._execute(
            "INSERT OR IGNORE INTO runs (run_id, session_id, owner, base_model, lora_config, created_at,"
            " last_request_time, user_metadata, last_seq, last_mutation_seq, origin_path, origin_with_optimizer)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.run_id,
                record.session_id,
                record.owner,
                record.base_model,
                json.dumps(record.lora_config),
                record.created_at,
                record.last_request_time,
                json.dumps(record.user_metadata),
                record.last_seq,
                record.last_mutation_seq,
                record.origin_path,
                int(record.origin_with_optimizer),
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

    def record_answer(self, run_id: str, seq_id: int, mutating: bool) -> None:
        """Note that the answer of ``seq_id`` is about to leave the server (see the module doc)."""
        self._execute(_RECORD_ANSWER, (now_iso(), seq_id, int(mutating), seq_id, run_id))

    def write_answers(self, answers: list[tuple[str, int, bool]], points: list[HistoryPoint], max_points: int) -> None:
        """``record_answer`` for each (run_id, seq_id, mutating) and ``add_history`` for each
        point, in ONE transaction (one commit for a whole clock cycle's answers)."""
        now = now_iso()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    _RECORD_ANSWER, [(now, seq, int(mutating), seq, run_id) for run_id, seq, mutating in answers]
                )
                for point in points:
                    self._insert_history(point, max_points)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- per-run history ---

    def add_history(self, point: HistoryPoint, max_points: int) -> None:
        """Record one step; past ``max_points`` rows the run's older rows are thinned to every
        other one (the newest kept), so a long run keeps its whole curve at a coarser grain."""
        with self._lock:
            self._insert_history(point, max_points)

    def _insert_history(self, point: HistoryPoint, max_points: int) -> None:
        fields = msgspec.structs.astuple(point)
        self._db.execute(f"INSERT OR REPLACE INTO run_history VALUES ({', '.join('?' * len(fields))})", fields)
        count = self._db.execute("SELECT COUNT(*) FROM run_history WHERE run_id = ?", (point.run_id,)).fetchone()[0]
        if count > max_points:
            steps = [r[0] for r in self._db.execute(
                "SELECT step FROM run_history WHERE run_id = ? ORDER BY step DESC", (point.run_id,)
            )]
            drop = [(point.run_id, step) for step in steps[1::2]]
            self._db.executemany("DELETE FROM run_history WHERE run_id = ? AND step = ?", drop)

    def history(self, run_id: str, after_step: int = 0) -> list[HistoryPoint]:
        """The run's recorded steps after ``after_step``, oldest first."""
        rows = self._execute(
            "SELECT * FROM run_history WHERE run_id = ? AND step > ? ORDER BY step", (run_id, after_step)
        )
        return [HistoryPoint(**dict(r)) for r in rows]

    def last_history(self, run_ids: list[str]) -> dict[str, HistoryPoint]:
        """The latest recorded step of each of ``run_ids`` that has one."""
        marks = ", ".join("?" * len(run_ids))
        rows = self._execute(
            f"SELECT h.* FROM run_history h JOIN (SELECT run_id, MAX(step) AS step FROM run_history"
            f" WHERE run_id IN ({marks}) GROUP BY run_id) m ON h.run_id = m.run_id AND h.step = m.step",
            tuple(run_ids),
        )
        return {r["run_id"]: HistoryPoint(**dict(r)) for r in rows}

    # --- samplers ---

    def add_sampler(self, record: SamplerRecord) -> None:
        self._execute(
            "INSERT OR IGNORE INTO samplers VALUES (?, ?, ?, ?, ?, ?)",
            (record.sampler_id, record.session_id, record.owner, record.base_model, record.model_path, record.created_at),
        )

    def list_samplers(self, owner: str, limit: int) -> list[SamplerRecord]:
        """The owner's samplers, newest first."""
        rows = self._execute(
            "SELECT * FROM samplers WHERE owner = ? ORDER BY created_at DESC, rowid DESC LIMIT ?", (owner, limit)
        )
        return [SamplerRecord(**dict(r)) for r in rows]

    def get_sampler(self, sampler_id: str) -> SamplerRecord | None:
        rows = self._execute("SELECT * FROM samplers WHERE sampler_id = ?", (sampler_id,))
        return SamplerRecord(**dict(rows[0])) if rows else None

    # --- checkpoints ---
    # An expired checkpoint is invisible to lookups and listings at once; the backend's sweep
    # deletes its row and files later.

    def put_checkpoint(self, record: CheckpointRecord) -> None:
        self._execute(
            "INSERT OR REPLACE INTO checkpoints (run_id, kind, name, owner, directory, created_at, size_bytes,"
            " expires_at, seq_id, published) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.run_id,
                record.kind,
                record.name,
                record.owner,
                record.directory,
                record.created_at,
                record.size_bytes,
                record.expires_at,
                record.seq_id,
                int(record.published),
            ),
        )

    def get_checkpoint(self, run_id: str, kind: str, name: str) -> CheckpointRecord | None:
        rows = self._execute(
            "SELECT * FROM checkpoints WHERE run_id = ? AND kind = ? AND name = ? AND " + _LIVE,
            (run_id, kind, name, now_iso()),
        )
        return _checkpoint(rows[0]) if rows else None

    def list_checkpoints(self, run_id: str) -> list[CheckpointRecord]:
        rows = self._execute(
            "SELECT * FROM checkpoints WHERE run_id = ? AND " + _LIVE + " ORDER BY created_at", (run_id, now_iso())
        )
        return [_checkpoint(r) for r in rows]

    def list_user_checkpoints(self, owner: str, limit: int, offset: int) -> tuple[list[CheckpointRecord], int]:
        now = now_iso()
        rows = self._execute(
            "SELECT * FROM checkpoints WHERE owner = ? AND " + _LIVE + " ORDER BY created_at DESC LIMIT ? OFFSET ?",
            (owner, now, limit, offset),
        )
        total = self._execute("SELECT COUNT(*) AS n FROM checkpoints WHERE owner = ? AND " + _LIVE, (owner, now))
        return [_checkpoint(r) for r in rows], total[0]["n"]

    def latest_weights(self, run_id: str) -> CheckpointRecord | None:
        """The run's live ``weights`` checkpoint written by its latest save (highest seq_id)."""
        rows = self._execute(
            "SELECT * FROM checkpoints WHERE run_id = ? AND kind = 'weights' AND " + _LIVE
            + " ORDER BY seq_id DESC LIMIT 1",
            (run_id, now_iso()),
        )
        return _checkpoint(rows[0]) if rows else None

    def checkpoint_by_seq(self, run_id: str, seq_id: int) -> CheckpointRecord | None:
        rows = self._execute(
            "SELECT * FROM checkpoints WHERE run_id = ? AND seq_id = ? AND " + _LIVE, (run_id, seq_id, now_iso())
        )
        return _checkpoint(rows[0]) if rows else None

    def storage_bytes(self, owner: str) -> int:
        """Bytes of all the owner's checkpoints, expired ones included until they are swept."""
        rows = self._execute("SELECT COALESCE(SUM(size_bytes), 0) AS n FROM checkpoints WHERE owner = ?", (owner,))
        return int(rows[0]["n"])

    def expired_checkpoints(self) -> list[CheckpointRecord]:
        rows = self._execute("SELECT * FROM checkpoints WHERE expires_at IS NOT NULL AND expires_at <= ?", (now_iso(),))
        return [_checkpoint(r) for r in rows]

    def checkpoint_directory(self, run_id: str, kind: str, name: str) -> str | None:
        """The directory of a checkpoint row, expired or not."""
        rows = self._execute(
            "SELECT directory FROM checkpoints WHERE run_id = ? AND kind = ? AND name = ?", (run_id, kind, name)
        )
        return rows[0]["directory"] if rows else None

    def checkpoint_directories(self) -> set[str]:
        return {r["directory"] for r in self._execute("SELECT directory FROM checkpoints")}

    def delete_checkpoint(self, run_id: str, kind: str, name: str, directory: str | None = None) -> bool:
        """Delete the row (only if it still points at ``directory``, when given); True if deleted."""
        sql = "DELETE FROM checkpoints WHERE run_id = ? AND kind = ? AND name = ?"
        params: tuple[Any, ...] = (run_id, kind, name)
        if directory is not None:
            sql, params = sql + " AND directory = ?", (*params, directory)
        with self._lock:
            return self._db.execute(sql, params).rowcount > 0

    # --- futures (requests of the HTTP protocol) ---

    def add_future(self, request_id: str, owner: str) -> None:
        self._execute("INSERT OR IGNORE INTO futures VALUES (?, ?, ?, 'pending')", (request_id, owner, now_iso()))

    def finish_future(self, request_id: str) -> None:
        self._execute("UPDATE futures SET state = 'done' WHERE request_id = ?", (request_id,))

    def future_state(self, request_id: str, owner: str) -> str | None:
        """'pending', 'done' or 'lost' (it was pending when the server stopped); None if unknown."""
        rows = self._execute("SELECT state FROM futures WHERE request_id = ? AND owner = ?", (request_id, owner))
        return rows[0]["state"] if rows else None

    def mark_pending_futures_lost(self) -> int:
        """At startup: nothing is running yet, so every 'pending' future died with the last process."""
        with self._lock:
            return self._db.execute("UPDATE futures SET state = 'lost' WHERE state = 'pending'").rowcount

    def prune_futures(self, older_than_iso: str) -> None:
        self._execute("DELETE FROM futures WHERE created_at < ? AND state != 'pending'", (older_than_iso,))


_LIVE = "(expires_at IS NULL OR expires_at > ?)"


def _run(row: sqlite3.Row) -> RunRecord:
    data = dict(row)
    data["lora_config"] = json.loads(data["lora_config"])
    data["user_metadata"] = json.loads(data["user_metadata"])
    data["origin_with_optimizer"] = bool(data["origin_with_optimizer"])
    return RunRecord(**data)


def _checkpoint(row: sqlite3.Row) -> CheckpointRecord:
    data = dict(row)
    data["published"] = bool(data["published"])
    return CheckpointRecord(**data)

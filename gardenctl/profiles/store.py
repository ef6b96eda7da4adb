"""The profile database: `<state>/profiles.sqlite3`, SQLite from Python's standard library.

One row per `ProfileKey`. A new measurement of a known key replaces the figures (the latest
start is the truth of today's vLLM and driver), counts the samples and keeps the non-KV
footprints of the last few starts: sizing takes the largest of them, so a start that happened
to profile smaller never shrinks the next claim, and an outlier ages out. Several gardenctl
processes (a watch, a status, an apply) may write at once: SQLite's
own locking serialises them (busy timeout 10 s). The file is 0600, like the rest of the state.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import fields
from pathlib import Path

from gardenctl.errors import StateError
from gardenctl.profiles.model import RECENT, Profile, ProfileKey

SCHEMA_VERSION = 1
FILE_NAME = "profiles.sqlite3"
KEY_COLUMNS = tuple(f.name for f in fields(ProfileKey))
VALUE_COLUMNS = tuple(f.name for f in fields(Profile) if f.name != "key")
_TYPES = {"tensor_parallel_size": "INTEGER NOT NULL", "enforce_eager": "INTEGER NOT NULL",
          "gpu_total_bytes": "INTEGER", "gpu_memory_utilization": "REAL",
          "weights_bytes": "INTEGER", "non_kv_bytes": "INTEGER", "kv_cache_bytes": "INTEGER",
          "kv_cache_tokens": "INTEGER", "kv_bytes_per_token": "INTEGER",
          "cuda_graph_bytes": "INTEGER", "max_model_len": "INTEGER", "max_concurrency": "REAL",
          "measured_at": "REAL", "samples": "INTEGER", "recent_non_kv": "TEXT",
          "graphs_in_budget": "INTEGER", "cuda_graph_estimated_bytes": "INTEGER"}


def _column(name: str) -> str:
    return f"{name} {_TYPES.get(name, 'TEXT NOT NULL' if name in KEY_COLUMNS else 'TEXT')}"


_CREATE = (
    f"CREATE TABLE IF NOT EXISTS profiles ("
    f"{', '.join(_column(c) for c in (*KEY_COLUMNS, *VALUE_COLUMNS))}, "
    f"PRIMARY KEY ({', '.join(KEY_COLUMNS)}))"
)


class ProfileStore:
    """Read and write measured profiles. Opening creates nothing until the first write."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def in_state(cls, root: str | Path) -> ProfileStore:
        return cls(Path(root) / FILE_NAME)

    @contextmanager
    def _connect(self, write: bool) -> Iterator[sqlite3.Connection]:
        if not write and not self.path.exists():
            raise FileNotFoundError(self.path)
        try:
            if write:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                os.close(fd)
            uri = f"file:{self.path}?mode={'rw' if write else 'ro'}"
            # isolation_level=None: transactions are ours (BEGIN IMMEDIATE in `record`).
            with closing(sqlite3.connect(uri, uri=True, timeout=10.0,
                                         isolation_level=None)) as db:
                db.row_factory = sqlite3.Row
                if write:
                    db.execute(_CREATE)
                    if db.execute("PRAGMA user_version").fetchone()[0] == 0:
                        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                _check_schema(db, self.path)
                yield db
        except sqlite3.DatabaseError as exc:
            raise StateError(f"profile database {self.path}: {exc}; `gardenctl profiles "
                             "forget` starts a new one") from None

    def record(self, profile: Profile) -> Profile:
        """Store a measurement; returns the row as stored (samples and maxima merged)."""
        with self._connect(write=True) as db:
            # IMMEDIATE: take the write lock before reading the old row, so that two
            # processes recording the same key cannot both read it and lose a sample.
            db.execute("BEGIN IMMEDIATE")
            try:
                merged = self._upsert(db, profile)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return merged

    @staticmethod
    def _upsert(db: sqlite3.Connection, profile: Profile) -> Profile:
        where = " AND ".join(f"{c} = ?" for c in KEY_COLUMNS)
        key_values = _key_values(profile.key)
        old = db.execute(f"SELECT * FROM profiles WHERE {where}", key_values).fetchone()
        before = Profile.from_row(old) if old is not None else None
        if before is not None and (before.measured_at, before.source) == (profile.measured_at,
                                                                         profile.source):
            return before  # the same start, seen again
        merged = _merge(before, profile)
        columns = (*KEY_COLUMNS, *VALUE_COLUMNS)
        values = (*key_values, *(_sql(getattr(merged, c)) for c in VALUE_COLUMNS))
        db.execute(f"INSERT OR REPLACE INTO profiles ({', '.join(columns)}) "
                   f"VALUES ({', '.join('?' for _ in columns)})", values)
        return merged

    def all(self) -> list[Profile]:
        try:
            with self._connect(write=False) as db:
                if not _has_table(db):
                    return []
                order = ", ".join(KEY_COLUMNS)
                rows = db.execute(f"SELECT * FROM profiles ORDER BY {order}").fetchall()
        except FileNotFoundError:
            return []
        return [Profile.from_row(r) for r in rows]

    def forget(self, model: str | None = None) -> int:
        """Delete every profile (of one model); returns how many were deleted. Forgetting
        everything in a damaged database (or one of another schema) removes the file."""
        if not self.path.exists():
            return 0
        if model is None:
            try:
                count = len(self.all())
            except StateError:
                count = 0
            self.path.unlink()
            return count
        with self._connect(write=True) as db:
            if model is None:
                return db.execute("DELETE FROM profiles").rowcount
            return db.execute("DELETE FROM profiles WHERE model = ?", (model,)).rowcount


def _check_schema(db: sqlite3.Connection, path: Path) -> None:
    """A database of another schema (another gardenctl version) is refused, never misread."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if not _has_table(db) and version == 0:
        return  # empty: nothing written yet
    columns = [row[1] for row in db.execute("PRAGMA table_info(profiles)")]
    if version != SCHEMA_VERSION or set(columns) != {*KEY_COLUMNS, *VALUE_COLUMNS}:
        raise StateError(f"profile database {path} was written by another version of "
                         f"gardenctl (schema {version}, this one reads {SCHEMA_VERSION}); "
                         "`gardenctl profiles forget` starts a new one")


def _has_table(db: sqlite3.Connection) -> bool:
    row = db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'profiles'")
    return row.fetchone() is not None


def _key_values(key: ProfileKey) -> tuple[object, ...]:
    return tuple(_sql(getattr(key, c)) for c in KEY_COLUMNS)


def _sql(value: object) -> object:
    return int(value) if isinstance(value, bool) else value


def _merge(before: Profile | None, new: Profile) -> Profile:
    from dataclasses import replace

    recent = [v for v in before.recent_non_kv.split(",") if v] if before is not None else []
    recent = [*recent, str(new.non_kv_bytes)][-RECENT:]
    return replace(new, samples=(before.samples if before is not None else 0) + 1,
                   recent_non_kv=",".join(recent))

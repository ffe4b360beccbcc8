"""The campaign store: one SQLite file per output folder, one row per finished trial.

WAL journal, a commit after every batch of finished trials, primary key
(condition_key, trial) with INSERT OR IGNORE: a trial delivered twice (a rescheduled Dask
task, a resumed run) is stored once. A trial's result depends only on its condition, its
index (its seed and data batch) and the campaign's identity (model, data, batch size,
metric, output, seed, fault model), saved on creation: opening the folder with another identity is an
error, while another grid (more formats, protections, BERs or experiments) only adds trials.

The store's format version (`meta` key `format_version`, written on creation) says how its
trials were drawn: a store without one is format 1 (flip positions by numpy's `choice`, one
random stream per condition); format 2 draws them in O(flips) (geometric gaps) and shares a
trial's draw between protections over the same stored bits; FORMAT_VERSION 3 shares them so and
draws them with cheaper streams (oppass.faults.SAMPLER_WORDS; docs/METHODS.md). A store resumes with
the draws of its own format, so its trials stay those of the code that made it, and so do the
trials a grid extension adds to it. Columns added later (`corrected_words`) are added to an
older store when it is opened, NULL in the rows it held.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import sqlite3
import types
import typing
from collections.abc import Iterable
from pathlib import Path

from oppass.campaign.records import TrialRecord
from oppass.errors import OppassError

STORE_FILE = "campaign.sqlite"
FORMAT_VERSION = 3
_UNVERSIONED = 1  # stores written before format versions existed
_TRIAL_FIELDS = [field.name for field in dataclasses.fields(TrialRecord)]
# Columns added since stores were first written: an older store gets them on opening, NULL in its rows.
_ADDED_COLUMNS = ("corrected_words",)
_ROW = operator.attrgetter(*_TRIAL_FIELDS)
_SQL_TYPES = {int: "INTEGER", float: "REAL", str: "TEXT"}


class Store:
    """Trials of one campaign in `directory`/campaign.sqlite."""

    def __init__(self, directory: Path, identity: dict) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OppassError(f"cannot create the output folder {directory}: {(error.strerror or '').lower()}") \
                from None
        self.path = directory / STORE_FILE
        if self.path.exists():
            self._check_readable()
        self.connection = sqlite3.connect(self.path)
        try:
            self.connection.execute("PRAGMA journal_mode=WAL")
            self.connection.execute("PRAGMA synchronous=NORMAL")
            self._create_tables()
            created = self.connection.execute("SELECT 1 FROM meta WHERE key = 'identity'").fetchone() is None
            self._check_identity(identity)
            if created:
                with self.connection:
                    self.connection.execute("INSERT INTO meta VALUES ('format_version', ?)", (str(FORMAT_VERSION),))
            self.format_version = self._format_version()
        except sqlite3.DatabaseError as error:
            self.connection.close()
            raise self._damaged(error) from None
        except BaseException:
            self.connection.close()
            raise

    def finished(self) -> set[tuple[str, int]]:
        """(condition key, trial) of every stored trial."""
        return set(self.connection.execute("SELECT condition_key, trial FROM trials"))

    def add(self, records: Iterable[TrialRecord]) -> int:
        """Stores finished trials and commits; returns how many were new."""
        placeholders = ", ".join("?" for _ in _TRIAL_FIELDS)
        rows = [_ROW(record) for record in records]
        before = self.connection.total_changes
        with self.connection:
            self.connection.executemany(
                f"INSERT OR IGNORE INTO trials ({', '.join(_TRIAL_FIELDS)}) VALUES ({placeholders})", rows
            )
        return self.connection.total_changes - before

    def trials(self) -> list[TrialRecord]:
        """Every stored trial, ordered by condition key and trial."""
        cursor = self.connection.execute(f"SELECT {', '.join(_TRIAL_FIELDS)} FROM trials ORDER BY condition_key, trial")
        return [TrialRecord(*row) for row in cursor]

    def save_batch_study(self, fmt: str, rows: list[tuple[int, int, float, float, float]]) -> None:
        """Stores the batch-size study of one format: (batch size, batches, min, max, mean) rows."""
        with self.connection:
            self.connection.executemany(
                "INSERT OR IGNORE INTO batch_study VALUES (?, ?, ?, ?, ?, ?)", [(fmt, *row) for row in rows]
            )

    def batch_study(self) -> list[tuple[str, int, int, float, float, float]]:
        """(format, batch size, batches, min, max, mean accuracy) rows of the batch-size study."""
        return list(self.connection.execute("SELECT * FROM batch_study ORDER BY format, batch_size"))

    def close(self) -> None:
        """Closes the database."""
        self.connection.close()

    def _create_tables(self) -> None:
        hints = typing.get_type_hints(TrialRecord)
        columns = ", ".join(f"{name} {column_type(hints[name])}" for name in _TRIAL_FIELDS)
        with self.connection:
            self.connection.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.connection.execute(
                f"CREATE TABLE IF NOT EXISTS trials ({columns}, PRIMARY KEY (condition_key, trial))"
            )
            present = {row[1] for row in self.connection.execute("PRAGMA table_info(trials)")}
            for name in _ADDED_COLUMNS:
                if name not in present:
                    self.connection.execute(f"ALTER TABLE trials ADD COLUMN {name} {column_type(hints[name])}")
            self.connection.execute(
                "CREATE TABLE IF NOT EXISTS batch_study (format TEXT, batch_size INTEGER, batches INTEGER,"
                " min_accuracy REAL, max_accuracy REAL, mean_accuracy REAL, PRIMARY KEY (format, batch_size))"
            )

    def _check_readable(self) -> None:
        """Refuses, without writing to it, a store whose tables or identity cannot be read."""
        try:
            connection = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        except sqlite3.DatabaseError as error:
            raise self._damaged(error) from None
        try:
            tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables:
                original = [name for name in _TRIAL_FIELDS if name not in _ADDED_COLUMNS]
                connection.execute(f"SELECT {', '.join(original)} FROM trials LIMIT 1").fetchall()
                (stored,) = connection.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()
                json.loads(stored)
        except (sqlite3.DatabaseError, json.JSONDecodeError, TypeError) as error:
            raise self._damaged(error) from None
        finally:
            connection.close()

    def _damaged(self, error: Exception) -> OppassError:
        return OppassError(f"the campaign store {self.path} is damaged ({str(error)[:200] or type(error).__name__}): "
                           "delete it to start the campaign over, or use another --out folder")

    def _format_version(self) -> int:
        row = self.connection.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()
        if row is not None and not str(row[0]).isdigit():
            raise self._damaged(ValueError(f"format_version {row[0]!r} is not a number"))
        version = _UNVERSIONED if row is None else int(row[0])
        if version > FORMAT_VERSION:
            raise OppassError(f"{self.path.parent} holds a campaign of store format {version}, newer than this oppass "
                              f"reads ({FORMAT_VERSION}): upgrade oppass or use another --out folder")
        return version

    def _check_identity(self, identity: dict) -> None:
        wanted = json.dumps(identity, sort_keys=True)
        with self.connection:
            self.connection.execute("INSERT OR IGNORE INTO meta VALUES ('identity', ?)", (wanted,))
        (stored,) = self.connection.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()
        if stored != wanted:
            differing = sorted(k for k in set(identity) | set(json.loads(stored))
                               if identity.get(k) != json.loads(stored).get(k))
            raise OppassError(
                f"{self.path.parent} holds a campaign with other results ({', '.join(differing)} differ): use "
                "another --out folder (formats, protections, BERs, experiments and studies may be added in place)"
            )


def column_type(annotation: object) -> str:
    """The SQLite column type of a field annotated `annotation` (int, float or str): NOT NULL unless the
    annotation admits None (`X | None`, `Optional[X]`)."""
    kinds: tuple[object, ...] = (annotation,)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = typing.get_args(annotation)
    values = [kind for kind in kinds if kind is not type(None)]
    if len(values) != 1 or values[0] not in _SQL_TYPES:
        raise TypeError(f"no SQLite column type for {annotation}: expected int, float or str, or one of them | None")
    sql = _SQL_TYPES[values[0]]
    return sql if len(values) < len(kinds) else f"{sql} NOT NULL"

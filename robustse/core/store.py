"""SQLite results store of a run directory: ``results.db``.

One row per finished *cell* (model × attack × eps) in ``cells`` and one row per example of that
cell in ``examples``, written together in one transaction: a killed sweep never leaves half a
cell, and a rerun skips the cells already there (``UNIQUE(model, attack_key, eps)``), so nothing
is lost or duplicated. Sanity-check outcomes go to ``checks``.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustse.core.errors import StoreError
from robustse.core.files import replace_file
from robustse.core.types import PathLike

SCHEMA_VERSION = "4"
LOCK_TIMEOUT_S = 30.0  # how long a write waits for another process's transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    attack TEXT NOT NULL,
    attack_key TEXT NOT NULL,
    norm TEXT NOT NULL,
    eps REAL NOT NULL,
    n INTEGER NOT NULL,
    correct INTEGER NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    seconds REAL NOT NULL,
    max_linf REAL, max_l2 REAL, min_pixel REAL, max_pixel REAL,
    nonfinite INTEGER NOT NULL DEFAULT 0,
    UNIQUE (model, attack_key, eps)
);
CREATE TABLE IF NOT EXISTS examples (
    cell_id INTEGER NOT NULL REFERENCES cells(id),
    idx INTEGER NOT NULL,
    label INTEGER NOT NULL,
    clean_pred INTEGER NOT NULL,
    adv_pred INTEGER NOT NULL,
    correct INTEGER NOT NULL,
    clean_margin REAL NOT NULL,
    adv_margin REAL NOT NULL,
    logit_sensitivity REAL, logit_change REAL, kl REAL,
    cg_correct INTEGER, cg_sensitivity REAL,
    fm_correct INTEGER, fm_sensitivity REAL,
    kl_calibrated REAL, logit_sensitivity_calibrated REAL,
    PRIMARY KEY (cell_id, idx)
);
CREATE TABLE IF NOT EXISTS sites (
    cell_id INTEGER NOT NULL REFERENCES cells(id),
    kind TEXT NOT NULL, site TEXT NOT NULL, metric TEXT NOT NULL, n INTEGER NOT NULL,
    mean REAL, sd REAL, q05 REAL, q25 REAL, q50 REAL, q75 REAL, q95 REAL,
    PRIMARY KEY (cell_id, site, metric)
);
CREATE TABLE IF NOT EXISTS site_examples (
    cell_id INTEGER NOT NULL REFERENCES cells(id),
    idx INTEGER NOT NULL, site TEXT NOT NULL, metric TEXT NOT NULL, value REAL,
    PRIMARY KEY (cell_id, site, metric, idx)
);
CREATE TABLE IF NOT EXISTS excitations (
    cell_id INTEGER NOT NULL REFERENCES cells(id),
    site TEXT NOT NULL, label INTEGER NOT NULL, n INTEGER NOT NULL, mean TEXT NOT NULL,
    PRIMARY KEY (cell_id, site, label)
);
CREATE TABLE IF NOT EXISTS gallery (
    cell_id INTEGER NOT NULL REFERENCES cells(id),
    idx INTEGER NOT NULL, shape TEXT NOT NULL, image BLOB NOT NULL,
    PRIMARY KEY (cell_id, idx)
);
CREATE TABLE IF NOT EXISTS models (
    model TEXT PRIMARY KEY,
    weight_hash TEXT NOT NULL DEFAULT '',
    checkpoint TEXT NOT NULL,
    arch TEXT,
    n INTEGER NOT NULL,
    clean_correct INTEGER NOT NULL,
    zero_grad_fraction REAL NOT NULL,
    probability_like INTEGER NOT NULL,
    train_mode_forwards INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS checks (
    model TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT NOT NULL,
    PRIMARY KEY (model, name)
);
"""


@dataclass(frozen=True)
class Cell:
    """A finished cell's summary (the per-example rows travel separately)."""

    model: str
    attack: str
    attack_key: str
    norm: str
    eps: float
    n: int
    correct: int
    seconds: float
    status: str = "done"
    reason: str | None = None
    max_linf: float | None = None
    max_l2: float | None = None
    min_pixel: float | None = None
    max_pixel: float | None = None
    nonfinite: int = 0


EXAMPLE_COLUMNS = ("idx", "label", "clean_pred", "adv_pred", "correct", "clean_margin", "adv_margin")
PROBE_COLUMNS = (
    "logit_sensitivity", "logit_change", "kl", "cg_correct", "cg_sensitivity", "fm_correct", "fm_sensitivity",
    "kl_calibrated", "logit_sensitivity_calibrated",
)  # fmt: skip
PROBE_TABLES = {"sites": 12, "site_examples": 5, "excitations": 5, "gallery": 4}  # table: columns with cell_id


class StoreReader:
    """The reading side of a results store: has a cell, its rows, the tables as DataFrames, the
    recorded meta values, and the CSV / Parquet exports (over an open ``conn``)."""

    conn: sqlite3.Connection

    def has_cell(self, model: str, attack_key: str, eps: float) -> bool:
        """Whether the cell is stored and finished (a failed cell is run again)."""
        row = self.conn.execute(
            "SELECT 1 FROM cells WHERE model = ? AND attack_key = ? AND eps = ? AND status = 'done'",
            (model, attack_key, eps),
        ).fetchone()
        return row is not None

    def cell_rows(self, model: str, attack_key: str, eps: float) -> list[tuple[int, int, float]]:
        """(correct, adv_pred, adv_margin) per example of a finished cell, in example order."""
        return self.conn.execute(
            "SELECT e.correct, e.adv_pred, e.adv_margin FROM examples e JOIN cells c ON c.id = e.cell_id"
            " WHERE c.model = ? AND c.attack_key = ? AND c.eps = ? ORDER BY e.idx",
            (model, attack_key, eps),
        ).fetchall()

    def roles(self) -> dict[str, str]:
        """``{attack name: role}`` as recorded by the sweeps that wrote this store (empty for stores
        written before roles were recorded)."""
        try:
            recorded = json.loads(self.get_meta("roles") or "{}")
        except ValueError:
            return {}
        return {str(k): str(v) for k, v in recorded.items()} if isinstance(recorded, dict) else {}

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def model_hash(self, model: str) -> str | None:
        row = self.conn.execute("SELECT weight_hash FROM models WHERE model = ?", (model,)).fetchone()
        return row[0] if row else None

    def cells(self):
        """All cells as a pandas DataFrame."""
        import pandas as pd

        return pd.read_sql_query("SELECT * FROM cells ORDER BY model, attack_key, eps", self.conn)

    def examples(self):
        """Per-example rows joined with their cell (model, attack, eps) as a DataFrame."""
        return self._with_cells("examples", "idx")

    def probe_table(self, table: str):
        """A probe table (``sites``, ``site_examples``, ``excitations``, ``gallery``) joined with its
        cell's model, attack, attack_key, norm and eps, as a DataFrame."""
        if table not in PROBE_TABLES:
            raise ValueError(f"unknown probe table {table!r}")
        return self._with_cells(table, "rowid")

    def _with_cells(self, table: str, last_key: str):
        """``table``'s rows, each preceded by its cell's model, attack, attack_key, norm and eps,
        ordered by model, attack_key, eps and then ``last_key`` (``idx`` or ``rowid``).

        The same frame as SQL's JOIN ... ORDER BY, joined and sorted in pandas instead: for the
        millions of rows of a probed run's ``site_examples`` it took half the time (measured on
        the demo's store, 2.2 M rows: 13.8 s -> 7.0 s)."""
        import pandas as pd

        head = ["model", "attack", "attack_key", "norm", "eps"]
        rows = pd.read_sql_query(f"SELECT rowid AS _rowid, * FROM {table}", self.conn)
        cells = pd.read_sql_query(f"SELECT id AS cell_id, {', '.join(head)} FROM cells", self.conn)
        order = head[:1] + ["attack_key", "eps", "_rowid" if last_key == "rowid" else last_key]
        joined = cells.merge(rows, on="cell_id").sort_values(order, kind="stable")
        return joined[head + [c for c in rows.columns if c != "_rowid"]].reset_index(drop=True)

    def models(self):
        import pandas as pd

        return pd.read_sql_query("SELECT * FROM models ORDER BY model", self.conn)

    def checks(self):
        import pandas as pd

        return pd.read_sql_query("SELECT * FROM checks ORDER BY model, name", self.conn)

    def export_csv(self, path: PathLike, examples=None) -> Path:
        """Write every per-example row with its cell columns to ``path`` (CSV).

        ``examples``: :meth:`examples` if the caller has already read it.
        """
        ex = self.examples() if examples is None else examples
        text = ex.drop(columns=["cell_id"]).to_csv(index=False)
        return replace_file(Path(path), lambda fh: fh.write(text.encode("utf-8")))

    def export_parquet(self, path: PathLike, examples=None) -> Path | None:
        """The same table as :meth:`export_csv` as Parquet, if pyarrow is installed (else None)."""
        if not _has_pyarrow():
            return None
        ex = self.examples() if examples is None else examples
        return replace_file(Path(path), lambda fh: ex.drop(columns=["cell_id"]).to_parquet(fh, index=False))


class ResultsStore(StoreReader):
    """The SQLite store of one run directory.

    Raises:
        StoreError: the file is not a robustse results database (corrupt, truncated or foreign);
            it is reported and never overwritten.
    """

    def __init__(self, path: PathLike, *, read_only: bool = False) -> None:
        self.path = Path(path)
        if self.path.is_symlink() and not read_only:  # SQLite would follow it and write wherever it points
            raise StoreError(f"{self.path} is a symbolic link: robustse never writes through one; remove it")
        _refuse_odd_file(self.path, read_only)
        existed = self.path.exists() and self.path.stat().st_size > 0
        if read_only and not existed:
            raise StoreError(f"{self.path}: no results store here")
        try:
            if read_only:  # a URI, so that SQLite never tries to write (a read-only file, directory or disk)
                self.conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=LOCK_TIMEOUT_S)
            else:
                self.conn = sqlite3.connect(str(self.path), timeout=LOCK_TIMEOUT_S)
            if existed:
                _check_schema(self.conn, self.path)
            if not read_only:
                with self.writing():
                    self.conn.executescript(SCHEMA)
                    self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        except StoreError:
            self._close_quietly()
            raise
        except sqlite3.DatabaseError as exc:
            self._close_quietly()
            healthy = _healthy_store_problem(self.path, exc)  # locked, read-only, full: not corrupt
            raise StoreError(
                healthy or f"{self.path}: corrupt or foreign results database ({exc}); move it away to start over"
            ) from None

    def _close_quietly(self) -> None:
        if hasattr(self, "conn"):
            self.conn.close()

    @contextmanager
    def writing(self, *, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction; a store that is locked for longer than ``LOCK_TIMEOUT_S``,
        read-only or on a full disk gives a one-line StoreError (the transaction rolls back).
        ``immediate``: take the write lock first, so what the transaction reads stays true until
        it commits (another process cannot write in between)."""
        try:
            with self.conn:
                if immediate:
                    self.conn.execute("BEGIN IMMEDIATE")
                yield self.conn
        except sqlite3.OperationalError as exc:
            raise StoreError(_healthy_store_problem(self.path, exc) or f"{self.path}: cannot write ({exc})") from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.writing() as conn:
            yield conn

    # ------------------------------------------------------------------ writing

    def write_cell(
        self,
        cell: Cell,
        rows: Iterable[tuple[Any, ...]],
        probes: dict[str, Iterable[tuple[Any, ...]]] | None = None,
        *,
        replace_model: bool = False,
    ) -> bool:
        """Commit a cell, its per-example rows and its probe rows in one transaction, replacing
        the stored cell it succeeds (a failed one) in that same transaction. A finished cell
        written meanwhile by another process stands: nothing is written and False is returned.

        Args:
            cell: the summary.
            rows: per-example tuples in ``EXAMPLE_COLUMNS`` order, optionally followed by the
                ``PROBE_COLUMNS`` values.
            probes: ``{table: rows without cell_id}`` for the tables in ``PROBE_TABLES``.
            replace_model: also drop every stored cell of ``cell.model`` (results of weights that
                have since changed), in the same transaction: until a successor is committed,
                nothing is lost.
        """
        with self.writing(immediate=True):
            if replace_model:
                self._delete_cells("model = ?", [cell.model])
            elif self.has_cell(cell.model, cell.attack_key, cell.eps):
                return False  # another process into this store finished it first: its result stands
            else:
                self._delete_cells("model = ? AND attack_key = ? AND eps = ?", [cell.model, cell.attack_key, cell.eps])
            cur = self.conn.execute(
                "INSERT INTO cells (model, attack, attack_key, norm, eps, n, correct, status, reason, seconds,"
                " max_linf, max_l2, min_pixel, max_pixel, nonfinite) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (cell.model, cell.attack, cell.attack_key, cell.norm, cell.eps, cell.n, cell.correct, cell.status,
                 cell.reason, cell.seconds, cell.max_linf, cell.max_l2, cell.min_pixel, cell.max_pixel,
                 cell.nonfinite),
            )  # fmt: skip
            cell_id = cur.lastrowid
            it = iter(rows)
            first = next(it, None)
            if first is not None:  # as many probe columns as the rows carry
                cols = ("cell_id", *EXAMPLE_COLUMNS, *PROBE_COLUMNS)[: len(first) + 1]
                sql = f"INSERT INTO examples ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
                self.conn.executemany(sql, ((cell_id, *r) for r in itertools.chain([first], it)))
            for table, trows in (probes or {}).items():
                if table not in PROBE_TABLES:
                    raise ValueError(f"unknown probe table {table!r}")
                marks = ", ".join("?" * PROBE_TABLES[table])
                self.conn.executemany(f"INSERT INTO {table} VALUES ({marks})", ((cell_id, *r) for r in trows))
        return True

    def write_model(self, model: str, **fields: Any) -> None:
        cols = ["model", *fields]
        with self.writing():
            self.conn.execute(
                f"INSERT OR REPLACE INTO models ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                (model, *fields.values()),
            )

    def check_identity(self, key: str, value: str, what: str, *, legacy: str | None = None) -> None:
        """Record ``value`` under ``key`` on first use; later runs must match it.

        ``legacy``: what a store that already holds cells but no ``key`` was written with (a
        store from before the key existed); recorded instead of ``value``.

        Raises:
            StoreError: the store was written for another ``what`` (never silently mixed).
        """
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:  # first use, unless a concurrent sweep records it first: then its value counts
            old = legacy is not None and self.conn.execute("SELECT 1 FROM cells LIMIT 1").fetchone() is not None
            with self.writing():
                self.conn.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, legacy if old else value))
            row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row[0] != value:
            raise StoreError(f"{self.path} holds results for a different {what}; use another --out or move it away")

    def set_meta(self, key: str, value: str) -> None:
        """Store a free-form value (e.g. the class names) in the ``meta`` table."""
        with self.writing():
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def record_roles(self, roles: dict[str, str]) -> None:
        """Add the roles of a sweep's attacks (``{name: role}``) to the store's record, so a report
        reads them without importing the attacks (README "Adding an attack").

        Raises:
            StoreError: a name recorded with another role (a changed plugin): never silently mixed.
        """
        with self.writing(immediate=True):
            known = self.roles()
            for name, role in roles.items():
                if known.get(name, role) != role:
                    raise StoreError(
                        f"{self.path}: attack {name!r} ran here as a {known[name]}, but is registered as a "
                        f"{role} now; use another --out"
                    )
            merged = json.dumps({**known, **roles}, sort_keys=True)
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('roles', ?)", (merged,))

    def delete_cells(self, model: str, *, attack_key: str | None = None, eps: float | None = None) -> int:
        """Delete a model's cells (optionally one attack / one eps) with their rows; returns how many."""
        where = "model = ?"
        args: list[Any] = [model]
        if attack_key is not None:
            where += " AND attack_key = ?"
            args.append(attack_key)
        if eps is not None:
            where += " AND eps = ?"
            args.append(eps)
        with self.writing():
            return self._delete_cells(where, args)

    def _delete_cells(self, where: str, args: list[Any]) -> int:
        """Delete the cells matching ``where`` with their rows, inside the caller's transaction."""
        ids = [r[0] for r in self.conn.execute(f"SELECT id FROM cells WHERE {where}", args)]
        for table in ("examples", *PROBE_TABLES):
            self.conn.executemany(f"DELETE FROM {table} WHERE cell_id = ?", [(i,) for i in ids])
        self.conn.executemany("DELETE FROM cells WHERE id = ?", [(i,) for i in ids])
        return len(ids)

    def update_model(self, model: str, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.writing():
            self.conn.execute(f"UPDATE models SET {sets} WHERE model = ?", (*fields.values(), model))

    def write_checks(self, rows: Iterable[tuple[str, str, str, str]]) -> None:
        """Replace the sanity-check table with (model, name, status, detail) rows."""
        with self.writing():
            self.conn.execute("DELETE FROM checks")
            self.conn.executemany("INSERT INTO checks VALUES (?,?,?,?)", rows)


def _check_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse an existing file that is not a healthy store of this schema. A database whose first
    transaction never committed (no table at all) counts as new.

    Raises:
        StoreError: a store of another schema version.
        sqlite3.DatabaseError: a corrupt or foreign database (the caller words it).
    """
    ok = conn.execute("PRAGMA quick_check").fetchone()
    if not ok or ok[0] != "ok":
        raise sqlite3.DatabaseError(f"integrity check: {ok[0] if ok else 'no answer'}")
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    except sqlite3.OperationalError:
        row = None
    version = row[0] if row else None
    if version is None and conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
        return  # its first transaction was rolled back
    if version is not None and version != SCHEMA_VERSION:
        raise StoreError(
            f"{path} was written by another robustse version (store schema {version}, this one "
            f"reads {SCHEMA_VERSION}); use another --out or move it away"
        )
    if version != SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"not a robustse results store (schema {version!r})")


def _refuse_odd_file(path: Path, read_only: bool) -> None:
    """One line for a ``results.db`` that is not a regular file (a directory, FIFO or device), and
    for reading a store whose last write was interrupted (its hot journal needs a writer to roll
    it back, which a read-only open cannot do)."""
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a FIFO, socket or device)"
        raise StoreError(f"{path} is {kind}, not a results store: move it away, or use another run directory")
    journal = path.with_name(path.name + "-journal")
    if read_only and path.is_file() and journal.is_file() and journal.stat().st_size > 0:
        raise StoreError(
            f"{path}: a write was interrupted ({journal.name} is still there); rerun the same sweep or experiment "
            "into this directory once (it recovers the store and keeps every finished cell), then report"
        )


def _healthy_store_problem(path: Path, exc: sqlite3.DatabaseError) -> str | None:
    """The one-line message for a store that is fine but cannot be used now (locked by another
    process, read-only, disk full), or None when the error says something else."""
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return (f"{path} is locked by another process (another sweep into this run directory?) for over "
                f"{LOCK_TIMEOUT_S:.0f} s; wait for it to finish, or use another --out")  # fmt: skip
    if "readonly" in text or "read-only" in text:
        return f"{path} is read-only: results cannot be added to it (robustse report can still read it)"
    if "full" in text or "disk i/o" in text:
        return f"{path}: cannot write ({exc}): free some disk space and rerun; finished cells are kept"
    return None


def _has_pyarrow() -> bool:
    import importlib.util

    return importlib.util.find_spec("pyarrow") is not None


def attack_key(description: dict[str, Any]) -> str:
    """A stable text key of an attack's configuration (its name and every option)."""
    return json.dumps(description, sort_keys=True, default=str)

"""Compare two run directories table by table: are the results the same, timings aside?

Reads every table of each ``results.db`` (cells keyed by model, attack and eps instead of their row
ids) and every CSV file of the run (``results.csv``, ``stats.csv``, ``models.csv``, ...). Columns
that hold timings (``seconds``, ``*_seconds``) are left out; paths are compared by file name, since
two runs live in different folders. Prints one line per table and exits 1 if any table differs.

    python benchmarks/compare_runs.py reports/quick-before reports/quick-after [--atol 0]
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pandas as pd

TIMING = ("seconds",)
PATH_COLUMNS = ("checkpoint",)
CELL_KEY = ["model", "attack_key", "eps"]


def _drop_timings(df: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in df.columns if c not in TIMING and not str(c).endswith("_seconds")]
    df = df[keep].copy()
    for c in PATH_COLUMNS:
        if c in df:
            df[c] = df[c].astype(str).map(lambda p: Path(p).name)
    return df


def store_tables(db: Path) -> dict[str, pd.DataFrame]:
    """Every table of a results store, rows identified by content instead of row ids."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        tables = {n: pd.read_sql_query(f"SELECT * FROM {n}", con) for n in names}
    finally:
        con.close()
    cells = tables["cells"]
    ids = cells.set_index("id")[CELL_KEY]
    for name, df in tables.items():
        if "cell_id" in df:
            tables[name] = ids.join(df.set_index("cell_id"), how="right").reset_index(drop=True)
    tables["cells"] = cells.drop(columns="id")
    return {f"results.db:{n}": _drop_timings(df) for n, df in tables.items()}


def csv_tables(run: Path) -> dict[str, pd.DataFrame]:
    """Every CSV file under a run directory, by relative path."""
    return {str(p.relative_to(run)): _drop_timings(pd.read_csv(p)) for p in sorted(run.rglob("*.csv"))}


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    cols = sorted(df.columns, key=str)
    return df[cols].sort_values(cols, kind="stable", na_position="first").reset_index(drop=True)


def difference(a: pd.DataFrame, b: pd.DataFrame, atol: float) -> str | None:
    """None when the tables hold the same rows (any order), else what differs, in a few words."""
    if set(a.columns) != set(b.columns):
        return f"columns differ: {sorted(set(a.columns) ^ set(b.columns), key=str)}"
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} rows"
    a, b = _sorted(a), _sorted(b)
    for c in a.columns:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.number):
            same = np.isclose(x.astype(float), y.astype(float), rtol=0, atol=atol, equal_nan=True)
        else:
            same = (x == y) | (pd.isna(x) & pd.isna(y))
        if not same.all():
            i = int(np.flatnonzero(~same)[0])
            return f"column {c!r}: {int((~same).sum())} value(s) differ (first: {x[i]!r} vs {y[i]!r})"
    return None


def compare(before: Path, after: Path, atol: float = 0.0) -> list[tuple[str, str]]:
    """(table, outcome) for every table found in either run."""
    tables = [store_tables(before / "results.db") | csv_tables(before),
              store_tables(after / "results.db") | csv_tables(after)]  # fmt: skip
    out = []
    for name in sorted(set(tables[0]) | set(tables[1])):
        if name not in tables[0] or name not in tables[1]:
            out.append((name, f"only in {'after' if name in tables[1] else 'before'}"))
            continue
        a, b = tables[0][name], tables[1][name]
        diff = difference(a, b, atol)
        out.append((name, f"identical ({len(a)} rows)" if diff is None else f"DIFFERENT: {diff}"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance for numbers (default: exact)")
    args = p.parse_args()
    rows = compare(args.before, args.after, args.atol)
    for name, outcome in rows:
        print(f"{name:<40} {outcome}")
    bad = [r for r in rows if not r[1].startswith("identical")]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} tables identical" + (f", {len(bad)} not" if bad else ""))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

"""Add measured rows to the table behind ``"auto"`` (``attention_gates/ops/measured.json``).

``python -m benchmarks.measured --add RESULTS.json [...]`` takes the rows of benchmark results (a
JSON list of rows, or an object with ``"rows"`` or ``"gate"``; ``gpu_check.sh`` writes
``auto_rows.json``, ``benchmarks.cpu_backends`` its ``"gate"`` rows) and writes them into the
table, replacing rows of the same key (see :mod:`attention_gates.ops.measured`). ``--show``
prints the table with the winner of every row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from attention_gates.ops import measured

from . import common

REQUIRED = (*measured.Key._fields, "ms", "commit", "source")


def _rows_of(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        data = data.get("rows", data.get("gate"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of rows, or an object with 'rows' or 'gate', got {type(data).__name__}")
    return data


def add_rows(rows: Sequence[dict], table: Path = measured.PATH) -> int:
    """Write ``rows`` into ``table`` (atomically), replacing rows of the same key; returns how many were replaced."""
    for i, r in enumerate(rows):
        missing = [f for f in REQUIRED if f not in r]
        if missing:
            raise ValueError(f"row {i} lacks {missing}: a row needs {list(REQUIRED)}")
        if not {"reference", "compile"} <= set(r["ms"]) or r["ms"]["reference"] is None:
            raise ValueError(f"row {i}: ms must time both 'reference' and 'compile' (compile may be null), got {r['ms']}")
    data = json.loads(table.read_text())
    key = lambda r: tuple(r[f] for f in measured.Key._fields)  # noqa: E731
    new = {key(r) for r in rows}
    kept = [r for r in data["rows"] if key(r) not in new]
    replaced = len(data["rows"]) - len(kept)
    data["rows"] = sorted([*kept, *rows], key=key)
    common.write_json(table, data, indent=1)
    return replaced


def show(table: Path = measured.PATH) -> str:
    rows = json.loads(table.read_text())["rows"]
    body = [[*(str(r[f]) for f in measured.Key._fields), " ".join(f"{k}={'-' if v is None else f'{v:.3g}'}" for k, v in r["ms"].items()),
             measured.row_winner(r) or "reference", r["commit"][:12]] for r in rows]  # fmt: skip
    return common.format_table([*measured.Key._fields, "ms", "auto takes", "commit"], body)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.measured", description=__doc__.split("\n\n")[0])
    p.add_argument("--add", nargs="+", default=[], metavar="RESULTS.json", help="benchmark results whose rows to add")
    p.add_argument("--show", action="store_true", help="print the table")
    args = p.parse_args(argv)
    for path in args.add:
        add_rows(_rows_of(Path(path)))
    if args.show or not args.add:
        print(show())


if __name__ == "__main__":
    main()

"""Write measured rows and CPU thresholds into the table behind ``"auto"`` (``attention_gates/ops/measured.json``).

``python -m benchmarks.measured_table --add RESULTS.json [...]`` takes the rows of benchmark
results (a JSON list of rows, or an object with ``"rows"`` or ``"gate"``; ``gpu_check.sh`` writes
``auto_rows.json``, ``benchmarks.cpu_backends`` its ``"gate"`` rows and its ``"thresholds"``) and
writes them into the table, replacing rows of the same key and thresholds of the same CPU (see
:mod:`attention_gates.ops.measured`, which reads the table). ``--show`` prints the table with the
winner of every row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from attention_gates.ops import measured

from . import common

REQUIRED = (*measured.Key._fields, "ms", "commit", "source")
THRESHOLD_FIELDS = ("capability", *measured.CpuThresholds._fields, "commit", "source")


def results_of(path: Path) -> tuple[list[dict], list[dict]]:
    """The rows and the CPU thresholds entries (a list, maybe empty) of a results file."""
    data = json.loads(path.read_text())
    thresholds = []
    if isinstance(data, dict):
        thresholds = [data["thresholds"]] if data.get("thresholds") else []
        data = data.get("rows", data.get("gate"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of rows, or an object with 'rows' or 'gate', got {type(data).__name__}")
    return data, thresholds


def add_rows(rows: Sequence[dict], table: Path = measured.PATH, thresholds: Sequence[dict] = ()) -> int:
    """Write ``rows`` and ``thresholds`` entries into ``table`` (atomically), replacing rows of the
    same key and thresholds of the same CPU capability; returns how many rows were replaced."""
    for i, r in enumerate(rows):
        missing = [f for f in REQUIRED if f not in r]
        if missing:
            raise ValueError(f"row {i} lacks {missing}: a row needs {list(REQUIRED)}")
        if not {"reference", "compile"} <= set(r["ms"]) or r["ms"]["reference"] is None:
            raise ValueError(f"row {i}: ms must time both 'reference' and 'compile' (compile may be null), got {r['ms']}")
    for i, t in enumerate(thresholds):
        missing = [f for f in THRESHOLD_FIELDS if f not in t]
        if missing:
            raise ValueError(f"thresholds entry {i} lacks {missing}: an entry needs {list(THRESHOLD_FIELDS)}")
    data = json.loads(table.read_text())
    key = lambda r: tuple(r[f] for f in measured.Key._fields)  # noqa: E731
    new = {key(r) for r in rows}
    kept = [r for r in data["rows"] if key(r) not in new]
    replaced = len(data["rows"]) - len(kept)
    data["rows"] = sorted([*kept, *rows], key=key)
    cpus = {t["capability"] for t in thresholds}
    entries = [t for t in data.get("cpu_thresholds", []) if t["capability"] not in cpus]
    data["cpu_thresholds"] = sorted([*entries, *({f: t[f] for f in THRESHOLD_FIELDS + ("machine",) if f in t} for t in thresholds)],
                                    key=lambda t: t["capability"])  # fmt: skip
    common.write_json(table, data, indent=1)
    return replaced


def show(table: Path = measured.PATH) -> str:
    """The table's rows with the choice of ``"auto"`` in each, and the CPU thresholds."""
    data = json.loads(table.read_text())
    body = [[*(str(r[f]) for f in measured.Key._fields), " ".join(f"{k}={'-' if v is None else f'{v:.3g}'}" for k, v in r["ms"].items()),
             measured.row_winner(r) or "reference", r["commit"][:12]] for r in data["rows"]]  # fmt: skip
    out = common.format_table([*measured.Key._fields, "ms", "auto takes", "commit"], body)
    fields = measured.CpuThresholds._fields
    entries = [[t["capability"], *(str(t[f]) for f in fields), t["commit"][:12]] for t in data.get("cpu_thresholds", [])]
    entries.append(["(any other CPU: defaults)", *(str(v) for v in measured.DEFAULT_CPU_THRESHOLDS), "-"])
    return out + "\n\nCPU thresholds:\n" + common.format_table(["capability", *fields, "commit"], entries)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.measured_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--add", nargs="+", default=[], metavar="RESULTS.json", help="benchmark results whose rows (and CPU thresholds) to add")
    p.add_argument("--show", action="store_true", help="print the table")
    args = p.parse_args(argv)
    for path in args.add:
        rows, thresholds = results_of(Path(path))
        add_rows(rows, thresholds=thresholds)
    if args.show or not args.add:
        print(show())


if __name__ == "__main__":
    main()

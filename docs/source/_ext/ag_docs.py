"""Local Sphinx extension of the attention-gates docs.

- :func:`api_modules` / :func:`canonical_names`: the modules listed in ``api.rst`` and, for
  every public name they export, the one page that documents it (in its defining module);
  re-exports such as ``attention_gates.GridAttentionGate`` resolve to that page.
- ``.. optional-figure:: /_static/...``: a figure when the image exists, else a visible note
  saying which file is missing (the images are produced by runs of the examples and benchmarks).
- ``.. optional-include:: path``: an include (``.md`` through MyST, its image paths made
  relative to the source folder) with the same fallback.
- At ``builder-inited``, the pieces of the benchmarks page (``_generated/bench_*.rst``: per
  headline one sentence and one short table per result file, each naming its machine and commit;
  the plots, those the scripts stored and those :mod:`benchmarks.plots` draws now; a download link
  to every result file) and
  ``_generated/guides_toc.rst`` (the toctree of the optional guide pages present) and
  ``_generated/pancreas_help.rst`` (the pancreas example's ``--help``) and
  ``_generated/measured.rst`` (the table ``"auto"`` follows, with the choice in every row, and the
  CPU paths' measured thresholds) and
  ``_generated/cpu_transform.rst`` (what the CPU transform's steps gained, from the stored
  ``cpu_backends.json`` results).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.parsers.rst.directives.images import Figure
from sphinx.directives.other import Include
from sphinx.util import logging

SOURCE = Path(__file__).resolve().parents[1]
ROOT = SOURCE.parents[1]
API_MODULES_FILE = SOURCE / "api.rst"
GENERATED = SOURCE / "_generated"
RESULTS = ROOT / "benchmarks" / "results"
OPTIONAL_GUIDES = ("cpu_guide",)  # pages written outside docs/ ownership; listed when present

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- API pages
def api_modules(api_rst: str) -> list[str]:
    """The module names listed (one per line, indented) in the autosummary blocks of ``api.rst``."""
    return re.findall(r"^ {3,}(attention_gates(?:\.\w+)*)\s*$", api_rst, flags=re.M)


def canonical_names(api_rst: str) -> dict[str, str]:
    """``{full name: canonical full name}`` for every name in the ``__all__`` of the listed modules.

    A class or function is canonical in the module that defines it (``__module__``) when that
    module is listed and exports it; anything else (data, or an object defined in an unlisted
    module) in the deepest listed module that exports the same object.
    """
    modules = api_modules(api_rst)
    mods = {m: importlib.import_module(m) for m in modules}
    out: dict[str, str] = {}
    for m, mod in mods.items():
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name)
            home = getattr(obj, "__module__", None)
            if home in mods and name in getattr(mods[home], "__all__", ()) and getattr(mods[home], name) is obj:
                out[f"{m}.{name}"] = f"{home}.{name}"
                continue
            exporters = [k for k, v in mods.items() if name in getattr(v, "__all__", ()) and getattr(v, name) is obj]
            out[f"{m}.{name}"] = f"{max(exporters, key=lambda k: (k.count('.'), k))}.{name}"
    return out


def _resolve_alias(app, env, node, contnode):
    """Resolve a reference to a re-export (``attention_gates.use_backend``) to its canonical page."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    names = app.config.autosummary_context.get("canonical", {})
    scopes = [node.get("py:module")] if node.get("py:module") else []
    for name in [target] + [f"{scope}.{target}" for scope in scopes]:
        canonical = names.get(name)
        if canonical is not None and canonical != target:
            break
    else:
        return None
    py = env.get_domain("py")
    return py.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], canonical, node, contnode)


# ------------------------------------------------------------------- optional content
def _missing(docname: str, path: str, what: str, hint: str) -> list[nodes.Node]:
    logger.info("ag_docs: %s: %s is missing; the page shows a note instead", docname, path)
    para = nodes.paragraph()
    para += nodes.Text(f"{what} not available in this build: ")
    para += nodes.literal(text=path)
    para += nodes.Text(" does not exist yet." + (f" {hint}" if hint else ""))
    return [nodes.note("", para)]


class OptionalFigure(Figure):
    """``.. figure::`` when the image file exists, else a note naming the missing file.

    Option ``:missing:`` adds a sentence to the note (how to produce the file).
    """

    option_spec = {**Figure.option_spec, "missing": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        env = self.state.document.settings.env
        hint = self.options.pop("missing", "")
        _, abspath = env.relfn2path(self.arguments[0], env.docname)
        if not Path(abspath).is_file():
            return _missing(env.docname, self.arguments[0], "Figure", hint)
        return super().run()


class OptionalInclude(Include):
    """``.. include::`` when the file exists (a ``.md`` file through MyST), else a note."""

    option_spec = {**Include.option_spec, "missing": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        hint = self.options.pop("missing", "")
        _, abspath = self.env.relfn2path(self.arguments[0], self.env.docname)
        if not Path(abspath).is_file():
            return _missing(self.env.docname, self.arguments[0], "Content", hint)
        if abspath.endswith(".md") and "parser" not in self.options:
            # image paths of the Markdown file are relative to it: make them absolute (from the
            # source folder) in a copy under _generated/, which is what gets included
            src = Path(abspath)
            base = "/" + src.parent.relative_to(SOURCE).as_posix() + "/"
            text = re.sub(
                r"(!\[[^\]]*\]\()(?![a-z]+:|/|#)([^)\s]+)",
                lambda m: m.group(1) + base + m.group(2),
                src.read_text(encoding="utf-8"),
            )
            copy = GENERATED / ("include-" + src.relative_to(SOURCE).as_posix().replace("/", "-"))
            write_if_changed(copy, text)
            self.env.note_dependency(abspath)
            self.arguments[0] = "/" + copy.relative_to(SOURCE).as_posix()
            self.options["parser"] = directives.parser_name("myst_parser.sphinx_")
        return super().run()


# ------------------------------------------------------------------ generated pages
class Rst(str):
    """A table cell that is reStructuredText already (a link): :func:`_fmt` keeps it as it is."""


def _fmt(v: Any) -> str:
    if isinstance(v, Rst):
        return str(v)
    if isinstance(v, bool) or v is None:
        text = str(v)
    elif isinstance(v, float):
        text = f"{v:.0f}" if abs(v) >= 1e4 else f"{v:.4g}"  # 20822, not 2.082e+04
    elif isinstance(v, (list, tuple)) and all(not isinstance(x, (dict, list)) for x in v):
        text = ", ".join(_fmt(x) for x in v)
    elif isinstance(v, dict):
        text = "; ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    else:
        text = str(v)
    return re.sub(r"([\\`*_|])", r"\\\1", text) or "\\ "


def _table(rows: list[dict], caption: str) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    out = [f".. list-table:: {caption}", "   :header-rows: 1", ""]
    for cells in [[_fmt(k) for k in keys]] + [[_fmt(r.get(k, "")) for k in keys] for r in rows]:
        out.append("   * - " + cells[0])
        out += [f"     - {c}" for c in cells[1:]]
    return out + [""]


def write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def generate(app) -> None:
    """Write the pieces under ``_generated/`` from what exists now."""
    generate_benchmarks(RESULTS, GENERATED)

    present = [g for g in OPTIONAL_GUIDES if (SOURCE / f"{g}.rst").is_file()]
    toc = [".. toctree::", "   :maxdepth: 1", "   :caption: Guides", ""] + [f"   {g}" for g in present] + [""]
    for g in OPTIONAL_GUIDES:
        if g not in present:
            logger.info("ag_docs: %s.rst is missing; the index says so", g)
            toc += [f".. note:: The page ``{g}.rst`` is not in this build (it does not exist yet).", ""]
    write_if_changed(GENERATED / "guides_toc.rst", "\n".join(toc) + "\n")
    write_if_changed(GENERATED / "measured.rst", "\n".join(render_measured()) + "\n")
    write_if_changed(GENERATED / "cpu_transform.rst", "\n".join(render_cpu_transform()) + "\n")
    generate_cli_help()


def render_cpu_transform() -> list[str]:
    """One table per stored ``cpu_backends.json``: inference time per model and transform step,
    its speed-up over the model as built, and the allocator setting's effect."""
    files = sorted(RESULTS.glob("*/cpu_backends.json")) if RESULTS.is_dir() else []
    if not files:
        return [".. note:: No ``cpu_backends.json`` in ``benchmarks/results``: run ``python -m benchmarks.cpu_backends``.", ""]
    lines: list[str] = []
    for f in files:
        data = json.loads(f.read_text(encoding="utf-8"))
        m = data["machine"]
        body = []
        for r in data.get("transform", []):
            for key, ms in r["ms"].items():
                arch, step = key.split("|")
                built = r["ms"][f"{arch}|as built"]
                body.append({"input": f"1x1x{r['size']}^3", "model": arch, "step": step.strip(), "ms": ms, "speed-up": built / ms})
        for r in data.get("allocator", []):
            default = r["ms"]["default"]
            for name, ms in r["ms"].items():
                body.append({"input": f"1x1x{r['size']}^3", "model": "AttentionUNet3D", "step": f"optimize_for_inference, allocator {name}",
                             "ms": ms, "speed-up": default / ms})  # fmt: skip
        caption = (f"inference (median ms) on {_fmt(m['cpu_model'])}, {m['torch_threads']} threads, torch {m['torch']}, "
                   f"commit {m['commit'][:10]}; speed-up over the model as built (allocator rows: over the default allocator)")  # fmt: skip
        lines += _table(body, caption)
    return lines


def render_measured() -> list[str]:
    """The rows of ``attention_gates/ops/measured.json`` as a table, with what ``"auto"`` takes in each."""
    from attention_gates.ops import measured

    rows = measured.rows()
    if not rows:
        return [".. note:: The table is empty: ``\"auto\"`` takes the reference everywhere.", ""]
    body = []
    for r in rows:
        cells = {f: r[f] for f in measured.Key._fields}
        cells.update({f"{k} (ms)": v for k, v in r["ms"].items()})
        cells["auto takes"] = measured.row_winner(r) or "reference"
        cells["measured on"] = f"{r.get('machine', '?')}, commit {r['commit'][:10]}"
        body.append(cells)
    lines = _table(body, "measured medians of the paper model's level-2 gate, and the choice of ``\"auto\"``")
    return lines + render_cpu_thresholds()


def render_cpu_thresholds() -> list[str]:
    """The ``cpu_thresholds`` of ``attention_gates/ops/measured.json`` as a table, with the defaults
    that every other CPU takes as its last row."""
    from attention_gates.ops import measured

    data = json.loads(measured.PATH.read_text(encoding="utf-8"))
    fields = measured.CpuThresholds._fields
    def sizes(t) -> dict:
        return {f: "2**62 (one path always)" if t[f] == measured.NEVER else t[f] for f in fields}

    body = [{"CPU": t["capability"], **sizes(t), "measured on": f"{t.get('machine', '?')}, commit {t['commit'][:10]}"}
            for t in data.get("cpu_thresholds", [])]  # fmt: skip
    body.append({"CPU": "any other", **sizes(measured.DEFAULT_CPU_THRESHOLDS._asdict()), "measured on": "defaults, not measured"})
    return _table(body, "where the CPU paths change strategy (sizes; see attention_gates.ops.measured.CpuThresholds)")


# ------------------------------------------------------------------ the benchmarks page
# Each table of the page comes from one result file (or from one machine's rows of measured.json)
# and names that machine and commit: numbers of two machines never share a table.
MODES = {"eval": "inference", "train": "training step"}
ONNX_RUNTIME = "onnxruntime"  # the key of ONNX Runtime's median in the ``ms`` of onnx_cpu.json's results
PLOT_CAPTIONS = {  # a stored plot's name without its device suffix -> what it shows
    "overhead_time": "Median time of each network against the input's voxels (bars: interquartile range), "
                     "inference and training step, 2D and 3D.",
    "overhead_memory": "Bytes saved for backward plus the output against the input's voxels, and the peak "
                       "memory of one training step at the largest input.",
    "gates_bandwidth": "One gate per gated level and backend: GB/s over the gate's byte floor, against a large copy.",
}  # fmt: skip
CROSSOVERS_CAPTION = ("Where the CPU paths change strategy (the thresholds of "
                      "``attention_gates.ops.measured.CpuThresholds``): time of the path taken from the threshold on "
                      "over the other path's, against the swept size; the dashed line is the threshold chosen.")  # fmt: skip


class Result(NamedTuple):
    """One JSON file of ``benchmarks/results`` as read (or one machine's rows of ``measured.json``)."""

    path: Path
    data: dict


class Block(NamedTuple):
    """What one result file says for one headline: a sentence (reStructuredText) and a short table."""

    sentence: str
    rows: list[dict]
    what: str  # the table's caption, to which the machine and commit are added


class Section(NamedTuple):
    """A headline of the page: the block each result file gives (by file name), and what writes the files."""

    blocks: dict[str, Callable[[dict], Optional[Block]]]
    hint: str


def load_results(results: Path) -> list[Result]:
    """Every JSON file under ``results`` that holds an object, in path order."""
    out = []
    for f in sorted(results.glob("**/*.json")) if results.is_dir() else []:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            logger.warning("ag_docs: cannot read %s: %s", f, e)
            continue
        if isinstance(data, dict):
            out.append(Result(f, data))
    return out


def machine_label(data: dict) -> str:
    """The machine a result was measured on: the GPU, or the CPU model, its cores, torch threads and version."""
    m = data.get("machine")
    if isinstance(m, dict) and m.get("gpu"):
        return f"{m['gpu']} (driver {m.get('driver')}), torch {m.get('torch')}"
    if isinstance(m, dict):
        return f"{m.get('cpu_model')} ({m.get('cpu_count')} cores), {m.get('torch_threads')} torch threads, torch {m.get('torch')}"
    return str(m) if m else "a machine the file does not name"


def machine_short(data: dict) -> str:
    """The GPU or CPU model alone: what a table's caption names."""
    m = data.get("machine")
    if isinstance(m, dict):
        return str(m.get("gpu") or m.get("cpu_model"))
    return str(m).split(" (")[0].split(",")[0] if m else "machine not named"


def commit_of(data: dict) -> Optional[str]:
    """The commit a result measured (``machine.commit``, or ``commit`` beside the machine)."""
    m = data.get("machine")
    return (m.get("commit") if isinstance(m, dict) else None) or data.get("commit")


def _commit_text(commit: Optional[str]) -> str:
    """``commit 0123456789 (2026-12-07)``: the date comes from git when the commit is in this repository."""
    if not commit:
        return "commit not recorded"
    date = ""
    if re.fullmatch(r"[0-9a-f]{7,40}", commit):
        try:
            done = subprocess.run(["git", "show", "-s", "--format=%cs", commit], cwd=ROOT, capture_output=True, text=True, timeout=30)
            date = done.stdout.strip() if done.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            pass
    return f"commit ``{commit[:10]}``" + (f" ({date})" if date else "")


def _link(path: Path) -> Rst:
    """A download link to ``path`` (a file anywhere in the repository), shown as its path from the root."""
    shown = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    return Rst(f":download:`{shown} </{Path(os.path.relpath(path, SOURCE)).as_posix()}>`")


def _x(v: Optional[float]) -> str:
    """A ratio as ``1.09x`` (``-`` when it was not measured)."""
    return "-" if v is None else f"{v:.2f}x"


def _span(values: Iterable[Optional[float]]) -> str:
    """``0.90x to 2.68x``: the range of the measured ratios."""
    xs = [v for v in values if v is not None]
    if not xs:
        return "not measured"
    low, high = _x(min(xs)), _x(max(xs))
    return low if low == high else f"{low} to {high}"


def _shape(dims: Any) -> str:
    return "x".join(map(str, dims)) if isinstance(dims, (list, tuple)) and dims else "?"


def _size(size: Any) -> str:
    """``64^3`` for a cube (an int is a cube's side), else ``160x160x96``."""
    if isinstance(size, int):
        return f"{size}^3"
    return f"{size[0]}^{len(size)}" if isinstance(size, (list, tuple)) and len(set(size)) == 1 else _shape(size)


def _first(record: dict, keys: Sequence[str]) -> Optional[float]:
    return next((record[k] for k in keys if record.get(k) is not None), None)


def _block_lines(r: Result, block: Block) -> list[str]:
    caption = f"{block.what}; {machine_short(r.data)}, commit {(commit_of(r.data) or 'not recorded')[:10]}"
    sentence = block.sentence[:1].upper() + block.sentence[1:]
    return [f"{sentence} {_measured_on(r)}", ""] + _table(block.rows, _fmt(caption))


def _measured_on(r: Result) -> str:
    """``Measured on *machine*, commit ... (date): link.``"""
    return f"Measured on *{_fmt(machine_label(r.data))}*, {_commit_text(commit_of(r.data))}: {_link(r.path)}."


# the headline blocks, one function per kind of result file
OVERHEAD_COLUMNS = (  # header -> the ratio fields of overhead.json that give it, the first present wins
    ("parameters", ("params",)),
    ("forward FLOPs", ("forward_flops",)),
    ("inference", ("inference_paired", "inference")),
    ("training step", ("train_step_paired", "train_step")),
    ("saved for backward + output", ("saved_plus_output_bytes",)),
    ("step peak RSS", ("step_rss",)),
    ("CUDA step memory", ("cuda_step_bytes",)),
)


def overhead_block(data: dict) -> Optional[Block]:
    """``overhead.json``: Attention U-Net (per gate backend) / U-Net at the largest input of each dimensionality."""
    rows = [r for r in data.get("ratios", []) if r.get("denominator") == "unet" and str(r.get("numerator")).startswith("attention_unet")]
    if not rows:
        return None
    largest = {d: max((r["size"] for r in rows if r["dims"] == d), key=math.prod) for d in {r["dims"] for r in rows}}
    rows = sorted((r for r in rows if r["size"] == largest[r["dims"]]), key=lambda r: (-r["dims"], r["numerator"]))
    batch = {p["dims"]: p.get("batch") for p in data.get("settings", {}).get("plan", [])}
    columns = [(h, keys) for h, keys in OVERHEAD_COLUMNS if any(_first(r, keys) is not None for r in rows)]

    def label(r: dict) -> str:
        return f"{r['dims']}D {_size(r['size'])}, batch {batch.get(r['dims'], '?')}"

    def backend(r: dict) -> str:
        found = re.search(r"\[(.+)\]", r["numerator"])
        return found.group(1) if found else "default"

    table = [{"input": label(r), "gates on": backend(r), **{h: _x(_first(r, keys)) for h, keys in columns}} for r in rows]
    best = min((r for r in rows if r["dims"] == rows[0]["dims"]), key=lambda r: _first(r, ("inference_paired", "inference")) or math.inf)
    c = {h: _x(_first(best, keys)) for h, keys in OVERHEAD_COLUMNS}
    sentence = (f"at {label(best)} the Attention U-Net has {c['parameters']} the U-Net's parameters and {c['forward FLOPs']} its "
                f"forward FLOPs; with its gates on ``{backend(best)}`` it takes {c['inference']} the U-Net's inference time and "
                f"{c['training step']} its training step, and keeps {c['saved for backward + output']} the bytes for backward.")  # fmt: skip
    return Block(sentence, table, "Attention U-Net / U-Net at the largest inputs measured (times: paired medians)")


NNUNET_METRICS = {
    "params": "parameters",
    "forward_flops": "forward FLOPs",
    "train_step_flops": "training-step FLOPs",
    "feature_map_size": "feature-map size (nnU-Net's count)",
    "forward_s": "prediction forward, time",
    "train_step_s": "training step, time",
    "step_memory_bytes": "training step, peak memory",
}


def nnunet_block(data: dict) -> Optional[Block]:
    """``nnunet_cost.json``: AttentionPlainConvUNet / PlainConvUNet in nnU-Net's default pancreas plan."""
    by = {r["metric"]: r for r in data.get("ratios", []) if "metric" in r}
    if not by:
        return None
    table = [{"metric": NNUNET_METRICS.get(m, m), "gated / plain": _x(r.get("gated_over_plain")), "paired": _x(r.get("paired"))}
             for m, r in by.items()]  # fmt: skip
    plan, timed = data.get("plan", {}), data.get("settings", {}).get("timed_patch")

    def v(metric: str) -> str:
        return _x(_first(by.get(metric, {}), ("paired", "gated_over_plain")))

    sentence = (f"in nnU-Net's 3d_fullres plan (patch {_shape(plan.get('patch_size'))}, batch {plan.get('batch_size', '?')}) "
                f"AttentionPlainConvUNet has {v('params')} the parameters and {v('forward_flops')} the forward FLOPs of "
                f"PlainConvUNet; timed at patch {_shape(timed)}, its prediction forward takes {v('forward_s')} the time and its "
                f"training step {v('train_step_s')}.")  # fmt: skip
    return Block(sentence, table, "AttentionPlainConvUNet / PlainConvUNet")


def network_block(data: dict) -> Optional[Block]:
    """``cpu_backends.json``: AttentionUNet3D (its gates on each backend) / UNet3D, channels-last, batch 1."""
    rows = [r for r in data.get("network", []) if r.get("ms", {}).get("UNet3D")]
    if not rows:
        return None
    backends = [b for b in dict.fromkeys(b for r in rows for b in r["ms"]) if b != "UNet3D"]
    table, best = [], []
    for r in rows:
        ratios = {b: r["ms"][b] / r["ms"]["UNet3D"] for b in backends if r["ms"].get(b)}
        best.append(min(ratios.values(), default=None))
        table.append({"input": f"{_size(r['size'])}, batch 1", "mode": MODES.get(r["mode"], r["mode"]), "UNet3D (ms)": r["ms"]["UNet3D"],
                      **{f"gates on {b}": _x(ratios.get(b)) for b in backends}})  # fmt: skip
    sentence = (f"channels-last inputs, batch 1: with its fastest gate backend AttentionUNet3D takes {_span(best)} the time "
                "of UNet3D (per input and mode).")
    return Block(sentence, table, "AttentionUNet3D / UNet3D time")


def gpu_models_block(data: dict) -> Optional[Block]:
    """A GPU run's ``results.json``: the training step of the 3D networks against UNet3D's."""
    from benchmarks import common

    models = {m["model"]: m for m in data.get("models", []) if "model" in m}
    base = models.get("UNet3D")
    if base is None:
        return None
    table = [{"model": name, "training step (ms)": m.get("step_ms"), "time / UNet3D": _x(common.ratio(m.get("step_ms"), base.get("step_ms"))),
              "peak memory (GiB)": m.get("max_mem_GiB"), "memory / UNet3D": _x(common.ratio(m.get("max_mem_GiB"), base.get("max_mem_GiB"))),
              "parameters": m.get("params")} for name, m in models.items()]  # fmt: skip
    others = "; ".join(f"{_fmt(row['model'])} takes {row['time / UNet3D']} the time of UNet3D and {row['memory / UNet3D']} its peak memory"
                       for row in table if row["model"] != "UNet3D")  # fmt: skip
    return Block(f"one training step of the 3D networks: {others or 'UNet3D only'}.", table, "training step of the 3D networks")


def _speedup_block(cases: list[tuple[dict, dict]], what: str) -> Optional[Block]:
    """Each backend's speed-up over ``reference`` per case; a case is ``(cells naming it, {backend: ms})``."""
    from benchmarks import common

    cases = [(cells, ms) for cells, ms in cases if ms.get("reference")]
    if not cases:
        return None
    backends = [b for b in dict.fromkeys(b for _, ms in cases for b in ms) if b != "reference"]
    ups = {b: [common.ratio(ms["reference"], ms.get(b)) for _, ms in cases] for b in backends}
    table = [{**cells, "reference (ms)": ms["reference"], **{f"{b}: speed-up": _x(ups[b][i]) for b in backends}}
             for i, (cells, ms) in enumerate(cases)]  # fmt: skip
    spans = "; ".join(f"``{b}`` {_span(v)}" for b, v in ups.items()) or "no other backend was measured"
    return Block(f"{what}; speed-up over the reference (its time over the backend's): {spans}.", table, "gate backends: speed-up over reference")


def _gate_cases(rows: list[dict]) -> list[tuple[dict, dict]]:
    """The gate rows of ``cpu_backends.json`` and ``measured.json`` as speed-up cases."""
    return [({"mode": MODES.get(r["mode"], r["mode"]), "layout": r.get("layout"), "dtype": r.get("dtype")}, r["ms"]) for r in rows if "ms" in r]


def cpu_gate_block(data: dict) -> Optional[Block]:
    """``cpu_backends.json``: the paper model's level-2 gate on each backend."""
    shapes = data.get("gate_shapes", {})
    what = f"the paper model's level-2 gate (x {_shape(shapes.get('x'))}, g {_shape(shapes.get('g'))})"
    return _speedup_block(_gate_cases(data.get("gate", [])), what)


def gates_block(data: dict) -> Optional[Block]:
    """``gates.json``: one gate per gated level of the paper model on each backend."""
    groups: dict[tuple, dict] = {}
    for r in data.get("results", []):
        groups.setdefault((r["level"], r["mode"]), {})[r["backend"]] = 1e3 * r["time_s"]["median"]
    cases = [({"level": level, "mode": MODES.get(mode, mode)}, ms) for (level, mode), ms in groups.items()]
    what = f"one gate per gated level of the paper model (model input {_shape(data.get('settings', {}).get('input'))})"
    return _speedup_block(cases, what)


def gpu_gates_block(data: dict) -> Optional[Block]:
    """A GPU run's ``results.json``: the paper model's gates per level, dtype and backend."""
    groups: dict[tuple, dict] = {}
    for r in data.get("gates", []):
        for mode in MODES:
            if r.get(f"{mode}_ms") is not None:
                groups.setdefault((r["level"], str(r["dtype"]).removeprefix("torch."), mode), {})[r["backend"]] = r[f"{mode}_ms"]
    cases = [({"level": level, "dtype": dtype, "mode": MODES[mode]}, ms) for (level, dtype, mode), ms in groups.items()]
    block = _speedup_block(cases, "the paper model's gates")
    note = data.get("commit_note")
    return block._replace(sentence=f"{block.sentence} About this run: {_fmt(note)}.") if block and note else block


def gate_memory_block(data: dict) -> Optional[Block]:
    """``gate_memory.json``: what one training gate keeps for backward, reference against triton."""
    from benchmarks import common

    rows = [p for p in data.get("paper", []) if p.get("reference") and p.get("triton")]
    if not rows:
        return None
    table = [{"level": p["level"], "x": _shape(p.get("x")), "reference": common.fmt_bytes(p["reference"]),
              "triton": common.fmt_bytes(p["triton"]), "reference / triton": _x(p["reference"] / p["triton"])} for p in rows]  # fmt: skip
    top = rows[0]
    sentence = ("bytes one training-mode gate keeps for backward beyond its inputs, outputs and parameters (counted for the "
                "reference; for ``triton`` computed from what its autograd saves, a formula checked by a count at a small "
                f"shape): at level {top['level']} of the paper model (x {_shape(top.get('x'))}) ``triton`` keeps "
                f"{common.fmt_bytes(top['triton'])} where the reference keeps {common.fmt_bytes(top['reference'])}.")  # fmt: skip
    return Block(sentence, table, "bytes saved for backward by one gate")


def onnx_block(data: dict) -> Optional[Block]:
    """``onnx_cpu.json``: each CPU path's time over ONNX Runtime's, for the same network and input.

    Reads ``results[]``, each with ``size`` (an int: a cube's side, or the spatial sizes), ``ms``
    (``{path: median ms}``, ONNX Runtime's under ``"onnxruntime"``) and optionally ``max_abs_diff``
    (a number, or ``{path: number}``: the largest difference from the eager model's output). The
    ratio shown is the median of the paired per-round ratios (``ratio_to_onnxruntime[path]["median"]``)
    where the file has it, with their quartiles (``"q1"``, ``"q3"``), else the ratio of the medians.
    The sentence names the run's conditions where the file records them (``settings.rounds``,
    ``settings.threads_spin``, ``load_average.start``): the CPU guide and the Deploy page show
    this block rather than copies of its numbers.
    """
    from benchmarks import common

    rows = [r for r in data.get("results", []) if isinstance(r.get("ms"), dict) and r["ms"].get(ONNX_RUNTIME)]
    if not rows:
        return None
    paths = [p for p in dict.fromkeys(p for r in rows for p in r["ms"]) if p != ONNX_RUNTIME]
    def paired(r: dict, p: str) -> Optional[float]:  # the median of the per-round ratios where the file has them
        return ((r.get("ratio_to_onnxruntime") or {}).get(p) or {}).get("median") or common.ratio(r["ms"].get(p), r["ms"][ONNX_RUNTIME])

    def quartiles(r: dict, p: str) -> Optional[tuple[float, float]]:  # of the per-round ratios, where the file has them
        q = (r.get("ratio_to_onnxruntime") or {}).get(p) or {}
        return (q["q1"], q["q3"]) if "q1" in q and "q3" in q else None

    def cell(r: dict, p: str, ratio: Optional[float]) -> str:  # ``0.79x [0.73, 0.82]``
        q = quartiles(r, p)
        return f"{_x(ratio)} [{q[0]:.2f}, {q[1]:.2f}]" if ratio is not None and q else _x(ratio)

    ratios = {p: [paired(r, p) for r in rows] for p in paths}
    table = [{"input": _size(r.get("size")), "ONNX Runtime (ms)": r["ms"][ONNX_RUNTIME], **{f"{p} / ONNX Runtime": cell(r, p, ratios[p][i]) for p in paths},
              **({"max abs diff": r["max_abs_diff"]} if "max_abs_diff" in r else {})} for i, r in enumerate(rows)]  # fmt: skip
    spans = "; ".join(f"``{p}`` {_span(v)}" for p, v in ratios.items()) or "no other path was measured"
    settings, load = data.get("settings") or {}, (data.get("load_average") or {}).get("start")
    conditions = []
    if "rounds" in settings:
        conditions.append(f"{settings['rounds']} paired rounds per size")
    if any(quartiles(r, p) for r in rows for p in paths):
        conditions.append("a ratio is the median of the per-round ratios [their quartiles]")
    if "threads_spin" in settings:
        spin = settings["threads_spin"]
        conditions.append("threads spinning while they wait (both runtimes' default)" if spin else "threads not spinning (``OMP_WAIT_POLICY=PASSIVE``)")
    if load:
        conditions.append(f"load average {load[0]:.1f} at the start")
    return Block(f"time of each CPU path over ONNX Runtime's, same network and input (below 1: faster than ONNX Runtime): {spans}"
                 + (f"; {', '.join(conditions)}." if conditions else "."), table, "CPU paths / ONNX Runtime")  # fmt: skip


HEADLINES = {  # generated piece -> its section; its blocks in this order of the files, then by path
    "bench_overhead": Section({"overhead.json": overhead_block, "nnunet_cost.json": nnunet_block, "cpu_backends.json": network_block,
                               "results.json": gpu_models_block}, "``python -m benchmarks.overhead`` writes ``overhead.json``."),
    "bench_backends": Section({"cpu_backends.json": cpu_gate_block, "gates.json": gates_block, "results.json": gpu_gates_block,
                               "gate_memory.json": gate_memory_block}, "``python -m benchmarks.cpu_backends`` writes ``cpu_backends.json``."),
    "bench_onnx": Section({"onnx_cpu.json": onnx_block}, "``python -m benchmarks.onnx_cpu`` writes it for the machine it runs on."),
}  # fmt: skip


def render_headline(results: list[Result], section: Section) -> list[str]:
    """The blocks of one headline, one per result file that has them (the files in the order of
    ``section.blocks``, then of their paths); a note when none has."""
    lines: list[str] = []
    order = list(section.blocks)
    for r in sorted((r for r in results if r.path.name in section.blocks), key=lambda r: order.index(r.path.name)):
        try:
            block = section.blocks[r.path.name](r.data)
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a format this page does not know: fail the build
            logger.warning("ag_docs: %s: not in the format the benchmarks page reads (%s: %s)", r.path, type(e).__name__, e)
            continue
        if block is not None:
            lines += _block_lines(r, block)
    if lines:
        return lines
    unread = [r for r in results if r.path.name in section.blocks]
    names = ", ".join(f"``{n}``" for n in section.blocks)
    why = (f"{', '.join(_link(r.path) for r in unread)} hold none of the numbers this part reads" if unread
           else f"no {names} under ``benchmarks/results/``")  # fmt: skip
    return [f".. note:: Not measured in this build: {why}. {section.hint}", ""]


def render_measured_rows(rows: list[dict], results: list[Result], measured_path: Path) -> list[str]:
    """Where the table ``"auto"`` follows comes from, and its rows whose source file is not shown
    above (a GPU run's, say): one table per machine and commit."""
    shown = {r.path.resolve() for r in results if r.data.get("gate")}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if (ROOT / str(row.get("source", ""))).resolve() not in shown:
            groups.setdefault((row.get("machine"), row.get("commit")), []).append(row)
    sources = sorted({str(row.get("source")) for row in rows})
    lines = [f"``\"auto\"`` chooses from the table {_link(measured_path)}, whose rows come from "
             f"{', '.join(f'``{s}``' for s in sources) or 'no measurement (it is empty)'}.", ""]  # fmt: skip
    for (machine, commit), group in groups.items():
        block = _speedup_block(_gate_cases(group), "the paper model's level-2 gate, as the table records it")
        if block is not None:
            lines += _block_lines(Result(measured_path, {"machine": machine, "commit": commit}), block)
    return lines


def _figure(png: Path, caption: str) -> list[str]:
    if not png.is_file():
        return [f".. note:: Plot not available in this build: ``{png.name}`` does not exist beside its results.", ""]
    return [f".. figure:: /{Path(os.path.relpath(png, SOURCE)).as_posix()}", "   :width: 100%", "", f"   {caption}", ""]


def render_plots(results: list[Result], out: Path) -> list[str]:
    """A figure per plot a result file lists (``plots``: PNGs written beside it by its script) and
    per crossover sweep (drawn now by :mod:`benchmarks.plots` into ``out``), each captioned with
    its machine and commit."""
    from benchmarks import plots

    lines: list[str] = []
    for r in results:
        where = _measured_on(r)
        for name in r.data.get("plots", []):
            png = r.path.parent / Path(name).name
            lines += _figure(png, f"{PLOT_CAPTIONS.get(re.sub(r'_(cpu|cuda)$', '', png.stem), png.stem)} {where}")
        if r.data.get("crossovers"):
            title = f"{machine_short(r.data)}, commit {(commit_of(r.data) or 'not recorded')[:10]}: {r.path.parent.name}/{r.path.name}"
            png = plots.crossovers(r.data["crossovers"], title, out / f"{r.path.parent.name}-crossovers.png")
            lines += _figure(png, f"{CROSSOVERS_CAPTION} {where}") if png else [
                ".. note:: A plot of the crossovers is not drawn in this build: matplotlib is not installed.", ""]
    return lines or [".. note:: No plots in this build: no result file under ``benchmarks/results/`` lists one.", ""]


def render_result_files(results: list[Result], measured_path: Path) -> list[str]:
    """Every result file (a download link), with its machine and commit; the notes beside them."""
    rows = [{"file": _link(r.path), "machine": machine_label(r.data), "commit": Rst(_commit_text(commit_of(r.data)))} for r in results]
    lines = _table(rows, "result files") if rows else [".. note:: No result files in this build.", ""]
    notes = sorted({r.path.parent / "README.md" for r in results if (r.path.parent / "README.md").is_file()})
    if notes:
        lines += [f"Notes on a run: {', '.join(_link(n) for n in notes)}.", ""]
    return lines + [f"The table ``\"auto\"`` follows: {_link(measured_path)}.", ""]


def generate_benchmarks(results_dir: Path, out: Path) -> None:
    """The pieces of the benchmarks page (``_generated/bench_*.rst``) from the results there are now."""
    from attention_gates.ops import measured

    results = load_results(results_dir)
    for name, section in HEADLINES.items():
        lines = render_headline(results, section)
        if name == "bench_backends":
            lines += render_measured_rows(measured.rows(), results, measured.PATH)
        write_if_changed(out / f"{name}.rst", "\n".join(lines) + "\n")
    write_if_changed(out / "bench_plots.rst", "\n".join(render_plots(results, out / "plots")) + "\n")
    write_if_changed(out / "bench_files.rst", "\n".join(render_result_files(results, measured.PATH)) + "\n")


def generate_cli_help() -> None:
    """``_generated/pancreas_help.rst``: the pancreas example's ``--help`` texts, so that the docs
    show the options the command line really has (nothing is written while it does not exist)."""
    out = GENERATED / "pancreas_help.rst"
    if not (ROOT / "examples" / "pancreas" / "__main__.py").is_file():
        out.unlink(missing_ok=True)
        return
    lines: list[str] = []
    for args in ((), ("train",)):
        cmd = [sys.executable, "-m", "examples.pancreas", *args, "--help"]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            logger.warning("ag_docs: %s failed (%d): %s", " ".join(cmd[1:]), done.returncode, done.stderr[-2000:])
            return
        lines += [".. code-block:: text", f"   :caption: python -m examples.pancreas {' '.join(args)} --help".rstrip(), ""]
        lines += [f"   {line}".rstrip() for line in done.stdout.splitlines()] + [""]
    write_if_changed(out, "\n".join(lines) + "\n")


def setup(app):
    app.add_directive("optional-figure", OptionalFigure)
    app.add_directive("optional-include", OptionalInclude)
    app.connect("builder-inited", generate)
    app.connect("missing-reference", _resolve_alias)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}

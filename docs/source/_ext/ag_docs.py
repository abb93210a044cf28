"""Local Sphinx extension of the attention-gates docs.

- :func:`api_modules` / :func:`canonical_names`: the modules listed in ``api.rst`` and, for
  every public name they export, the one page that documents it (in its defining module);
  re-exports such as ``attention_gates.GridAttentionGate`` resolve to that page.
- ``.. optional-figure:: /_static/...``: a figure when the image exists, else a visible note
  saying which file is missing (the images are produced by runs of the examples and benchmarks).
- ``.. optional-include:: path``: an include (``.md`` through MyST, its image paths made
  relative to the source folder) with the same fallback.
- At ``builder-inited``, ``_generated/benchmarks.rst`` (tables from
  ``benchmarks/results/**/*.json`` and the plots in ``_static/benchmarks/``) and
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
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.parsers.rst.directives.images import Figure
from sphinx.directives.other import Include
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

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
def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        text = str(v)
    elif isinstance(v, float):
        text = f"{v:.4g}"
    elif isinstance(v, (list, tuple)) and all(not isinstance(x, (dict, list)) for x in v):
        text = ", ".join(_fmt(x) for x in v)
    elif isinstance(v, dict):
        text = "; ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    else:
        text = str(v)
    return re.sub(r"([\\`*_|])", r"\\\1", text) or "\\ "


def _records(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(r, dict) for r in v)


def _table(rows: list[dict], caption: str) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    out = [f".. list-table:: {caption}", "   :header-rows: 1", ""]
    for cells in [[_fmt(k) for k in keys]] + [[_fmt(r.get(k, "")) for k in keys] for r in rows]:
        out.append("   * - " + cells[0])
        out += [f"     - {c}" for c in cells[1:]]
    return out + [""]


def render_results(path: Path, data: Any) -> list[str]:
    """reStructuredText for one benchmark JSON file: its scalar fields (the machine among them)
    as a field list, every list of records as a table."""
    title = str(path.relative_to(ROOT))
    lines = [title, "~" * len(title), ""]
    if _records(data):
        data = {"results": data}
    if not isinstance(data, dict):
        return lines + [f"(not a table: {_fmt(type(data).__name__)})", ""]
    fields = {k: v for k, v in data.items() if not _records(v)}
    if not any(k.lower() in ("machine", "device", "devices", "hardware", "system", "env", "environment", "host") for k in fields):
        lines += [".. warning:: This result file does not name the machine it was measured on.", ""]
    for k, v in fields.items():
        lines.append(f":{_fmt(k)}: {_fmt(v)}")
    lines.append("")
    for k, v in data.items():
        if _records(v):
            lines += _table(v, _fmt(k))
    return lines


def write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def generate(app) -> None:
    """Write ``_generated/benchmarks.rst`` and ``_generated/guides_toc.rst`` from what exists now."""
    lines: list[str] = []
    files = sorted(RESULTS.glob("**/*.json")) if RESULTS.is_dir() else []
    for f in files:
        try:
            lines += render_results(f, json.loads(f.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            logger.warning("ag_docs: cannot read %s: %s", f, e)
    if not files:
        lines += [
            ".. note:: No benchmark results in this build: ``benchmarks/results/**/*.json`` does not",
            "   exist yet. The benchmark scripts under ``benchmarks/`` write it.",
            "",
        ]
    plots = sorted((SOURCE / "_static" / "benchmarks").glob("*.png"))
    for png in plots:
        caption = png.stem.replace("_", " ")
        lines += [f".. figure:: /_static/benchmarks/{png.name}", "   :width: 90%", "", f"   {caption}", ""]
    if not plots:
        lines += [".. note:: No benchmark plots in this build: ``_static/benchmarks/*.png`` does not exist yet.", ""]
    write_if_changed(GENERATED / "benchmarks.rst", "\n".join(lines) + "\n")

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

"""The documentation covers the public API: every public module is listed in ``docs/source/api.rst``
and every public name gets its own page there (cheap checks, no Sphinx build)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

import attention_gates

DOCS = Path(__file__).resolve().parents[1] / "docs" / "source"
sys.path.insert(0, str(DOCS / "_ext"))
ag_docs = pytest.importorskip("ag_docs", reason="the docs extension needs sphinx (the docs extra)")

API_RST = (DOCS / "api.rst").read_text(encoding="utf-8")


def public_modules() -> list[str]:
    """Modules of the package with an ``__all__`` and no private (``_``) part in their name."""
    names = ["attention_gates"]
    for info in pkgutil.walk_packages(attention_gates.__path__, "attention_gates."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(n for n in names if hasattr(importlib.import_module(n), "__all__"))


def test_api_rst_lists_every_public_module():
    listed = ag_docs.api_modules(API_RST)
    assert len(listed) == len(set(listed)), f"api.rst lists a module twice: {listed}"
    missing = sorted(set(public_modules()) - set(listed))
    assert not missing, f"add these modules to docs/source/api.rst: {missing}"
    for name in listed:
        importlib.import_module(name)  # a listed module that no longer exists fails here


@pytest.mark.parametrize("name", attention_gates.__all__)
def test_every_public_name_has_its_own_page(name):
    """The module template gives a page to each name whose canonical home is the module
    documenting it; the home must be a listed module that exports the very same object."""
    canonical = ag_docs.canonical_names(API_RST)
    home = canonical[f"attention_gates.{name}"]
    module, _, short = home.rpartition(".")
    assert short == name
    assert module in ag_docs.api_modules(API_RST)
    mod = importlib.import_module(module)
    assert name in mod.__all__ and getattr(mod, name) is getattr(attention_gates, name)
    assert canonical[home] == home  # the page is generated there, not linked elsewhere
    obj = getattr(attention_gates, name)
    if hasattr(obj, "__qualname__") and hasattr(obj, "__module__"):
        assert module == obj.__module__, f"{name} is documented in {module}, defined in {obj.__module__}"


def test_module_template_generates_pages_for_canonical_names_only():
    template = (DOCS / "_templates" / "autosummary" / "module.rst").read_text(encoding="utf-8")
    assert ":toctree:" in template and "canonical.get(full) == full" in template


def test_api_modules_parser():
    text = "Title\n=====\n\n.. autosummary::\n   :toctree: x\n\n   attention_gates\n   attention_gates.ops.cpu\n\nattention_gates.not_listed\n"
    assert ag_docs.api_modules(text) == ["attention_gates", "attention_gates.ops.cpu"]


def test_benchmark_json_renders_machine_and_records():
    path = ag_docs.ROOT / "benchmarks" / "results" / "x.json"
    data = {"machine": {"cpu": "Xeon", "threads": 2}, "results": [{"backend": "cpu", "ms": 1.23456}, {"backend": "reference", "ms": 2.0, "note": "a_b"}]}
    rst = "\n".join(ag_docs.render_results(path, data))
    assert ":machine: cpu: Xeon; threads: 2" in rst
    assert "   * - backend\n     - ms\n     - note" in rst
    assert "   * - cpu\n     - 1.235\n     - " in rst and "a\\_b" in rst
    assert "does not name the machine" in "\n".join(ag_docs.render_results(path, {"results": data["results"]}))

"""Sphinx configuration of the attention-gates documentation (built by ``scripts/docs.sh``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE / "_ext"))

import attention_gates  # noqa: E402
from ag_docs import API_MODULES_FILE, api_modules, canonical_names  # noqa: E402

project = "attention-gates"
author = "attention-gates developers"
copyright = "attention-gates developers"
release = attention_gates.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "ag_docs",
]
if os.environ.get("DOCS_INTERSPHINX") == "1":  # off by default: CI builds offline
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "torch": ("https://docs.pytorch.org/docs/stable/", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "python": ("https://docs.python.org/3", None),
    }

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_generated", "_static"]  # _generated: included pieces; _static: files, not pages
templates_path = ["_templates"]
html_theme = "furo"
html_title = f"attention-gates {release}"
html_static_path = ["_static"]

# every reference must resolve; torch and numpy objects are links only with DOCS_INTERSPHINX=1
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|numpy|np|nn|F|monai)(\..*)?"),
    (r"py:.*", r"Tensor"),
    (r"py:.*", r"(collections\.abc|os|typing|pathlib|contextlib|enum|dataclasses)\..*"),  # the standard library
    (r"py:class", r"(attention_gates\.gates\.)?Factor"),  # the type alias int | Sequence[int], described in each docstring
    (r"py:.*", r"(nnunetv2|dynamic_network_architectures)(\..*)?"),  # nnU-Net's classes (the nnunet extra): no inventory
    (r"py:class", r"(attention_gates\.integrations\.nnunet\.(network|plans)\.)?(Source|PathLike)"),  # type aliases, described
]

autosummary_generate = True
autosummary_ignore_module_all = False  # a module's public names are its __all__
autosummary_imported_members = False
# alias -> canonical name, so that every object gets one page, in the module that defines it
_api_rst = API_MODULES_FILE.read_text(encoding="utf-8")
autosummary_context = {"canonical": canonical_names(_api_rst)}
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_inherit_docstrings = False  # not torch.nn.Module.forward's docstring on every forward
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = ["Shapes"]
myst_heading_anchors = 3

# doctests: the docstrings' examples run with their module's names (as pytest --doctest-modules does)
doctest_global_setup = "import importlib.util\nimport torch\nfrom torch import nn\ntorch.manual_seed(0)\n" + "".join(
    f"from {m} import *\n" for m in api_modules(_api_rst))

#!/usr/bin/env bash
# The documentation: HTML with warnings as errors, then the doctests of every page (the
# tutorials and the docstrings shown in the API reference). Offline by default; set
# DOCS_INTERSPHINX=1 to link PyTorch, NumPy and Python objects (needs the network).
# Output: docs/_build/html (open index.html) and docs/_build/doctest/output.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
# autosummary pages are regenerated from the code each time: drop pages of removed names (and -E:
# a fresh environment, so that no page read before a change of the code keeps its old references)
rm -rf docs/source/_autosummary docs/source/_generated
# (the doctest builder reads the environment the HTML build just wrote: the pages are parsed once)
"$PY" -m sphinx -E -W --keep-going -q -d docs/_build/doctrees -b html docs/source docs/_build/html
"$PY" -m sphinx -W --keep-going -q -d docs/_build/doctrees -b doctest docs/source docs/_build/doctest
tail -n 6 docs/_build/doctest/output.txt

# Sourced by the set-up scripts: create .venv (if missing) and install the project with the
# given extras. torch==2.13.0 is installed first where no torch is present: it takes the CPU
# build; a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
# the extras are installed with that torch held: otherwise a requirement of theirs (the nnunet extra's
# timm needs torchvision, whose newest release needs the newest torch) would replace it with a CUDA build
TORCH_PIN="$(mktemp)"
"$PY" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > "$TORCH_PIN"
"$PY" -m pip install -q -e ".[$EXTRAS]" -c "$TORCH_PIN"
rm -f "$TORCH_PIN"

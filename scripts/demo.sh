#!/usr/bin/env bash
# The main job: the pancreas example on its built-in phantom (trains AttentionUNet3D and
# UNet3D on 2 CPU cores, evaluates both, writes runs/demo/report.md). Extra args go to `demo`.
EXTRAS=examples source "$(dirname "$0")/_venv.sh"
exec "$PY" -m examples.pancreas demo "$@"

"""The README's quickstart runs as written and prints what it says."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_and_prints_the_counts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the blocks write files (the Deploy section's net.onnx) where they run
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for code in blocks:
            exec(compile(code, str(README), "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines[0] == "6472784 5887466"
    assert "torch.Size([1, 2, 40, 48, 36])" in lines[1]
    assert lines[2] == "torch.Size([2, 32, 16, 16, 16]) torch.Size([2, 1, 16, 16, 16])"
    assert (tmp_path / "net.onnx").stat().st_size > 100_000  # the Deploy section's export, checked in ONNX Runtime


def test_setup_commands_exist():
    text = README.read_text()
    root = README.parent
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"bash {script}" in text
        assert (root / script).is_file()
    assert "scripts/test.sh" in (root / ".ci" / "run").read_text()

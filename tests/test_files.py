"""attention_gates.files: atomic, durable writes and the temporaries a killed writer leaves."""

import os
import subprocess
import sys

import pytest
import torch

from attention_gates.files import atomic_write, remove_stale_temporaries, stale_temporaries


def test_writes_bytes_text_and_writer_functions(tmp_path):
    assert atomic_write(tmp_path / "a.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert atomic_write(tmp_path / "sub" / "b.txt", "héllo").read_text(encoding="utf-8") == "héllo"
    path = atomic_write(tmp_path / "c.pt", lambda f: torch.save({"w": torch.arange(3)}, f))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.bin", "b.txt", "c.pt", "sub"]  # no temporaries left


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = atomic_write(tmp_path / "keep.txt", "old")

    def broken(f):
        f.write(b"half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_refuses_a_folder(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        atomic_write(tmp_path, "x")


def test_stale_temporaries_are_those_of_dead_processes(tmp_path):
    target = tmp_path / "checkpoint.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".checkpoint.pt.{dead_pid}.0a1b2c3d.tmp"
    live = tmp_path / f".checkpoint.pt.{os.getpid()}.0a1b2c3d.tmp"
    other = tmp_path / f".best.pt.{dead_pid}.0a1b2c3d.tmp"
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    assert stale_temporaries(target) == [stale]
    assert remove_stale_temporaries(target) == [stale]
    assert not stale.exists() and live.exists() and other.exists()
    assert stale_temporaries(tmp_path / "missing" / "x.pt") == []

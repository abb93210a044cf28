"""Nothing lost, nothing clobbered: the pancreas example under stop signals, a kill in the middle
of a checkpoint write, a damaged ``best.pt``, a bad case in the test split, and command-line
arguments that cannot work (issue 24, the example's rows).

Runs on CPU with the ``"tiny"`` preset; the signals and the kill go to real training
subprocesses (``python -m examples.pancreas train``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
nib = pytest.importorskip("nibabel")

from examples.pancreas.__main__ import main  # noqa: E402
from examples.pancreas.cases import find_cases, load_cases  # noqa: E402
from examples.pancreas.checkpoints import CheckpointError, load_checkpoint, read_log  # noqa: E402
from examples.pancreas.config import preset  # noqa: E402
from examples.pancreas.splits import split_cases  # noqa: E402
from examples.pancreas.train import train  # noqa: E402
from pancreas_folders import cube_label, unprivileged, write_msd, write_nifti  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_cases():
    return load_cases(preset("tiny"))


def _equal_runs(a: Path, b: Path) -> None:
    """Two run folders hold the same training: log rows (but the seconds), the checkpoint's step,
    validation record, weights and optimizer state, bit for bit."""
    rows = [[{k: v for k, v in r.items() if k != "seconds"} for r in read_log(run / "log.csv", 10**9)] for run in (a, b)]
    assert str(rows[0]) == str(rows[1])  # str: NaN == NaN
    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert ca["step"] == cb["step"] == len(rows[0]) and ca["validation"] == cb["validation"]
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    for i, state in ca["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(cb["optimizer"]["state"][i][k])), (i, k)


# ----------------------------------------------------------------------------- Ctrl-C and SIGTERM

SIGNAL_RUN = ["--preset", "tiny", "--steps", "24", "--checkpoint-every", "3", "--val-every", "0", "--deterministic"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_cases):
    out = tmp_path_factory.mktemp("uninterrupted")
    train(preset("tiny", steps=24, checkpoint_every=3, val_every=0, deterministic=True), out, progress=False, cases=tiny_cases)
    return out


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a shell's background job starts with SIGINT ignored


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_finishes_the_step_saves_it_and_resume_is_bit_exact(tmp_path, tiny_cases, uninterrupted, signum, status):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "examples.pancreas", "train", *SIGNAL_RUN, "--no-progress", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 200
    while proc.poll() is None and time.monotonic() < deadline:  # the first log row: step 3 is done
        if (out / "log.csv").is_file() and len((out / "log.csv").read_text().splitlines()) > 1:
            break
        time.sleep(0.02)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=200)
    assert proc.returncode == status, stderr[-3000:]
    step = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 3 <= step < 24  # the step in progress finished and was saved, wherever the signal fell
    assert len(read_log(out / "log.csv", 10**9)) == step
    name = signal.Signals(signum).name
    assert stderr.strip().splitlines() == [
        f"{name}: training stopped after step {step} of 24, saved in {out / 'checkpoint.pt'}; "
        f"resume with: python -m examples.pancreas train --out {out} --resume --no-progress"
    ]  # one line, no traceback
    assert not list(out.glob(".*.tmp")) and not (out / "results.json").exists()  # no evaluation of a stopped run
    resumed = train(preset("tiny", steps=24, checkpoint_every=3, val_every=0, deterministic=True), out, resume=True, progress=False,
                    cases=tiny_cases)  # fmt: skip
    assert resumed["steps"] == 24
    _equal_runs(uninterrupted, out)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_stopped_comparison_resumes_where_it_stopped(tmp_path, tiny_cases):
    """SIGTERM to ``compare`` (each model trains in a child process): the child finishes its step and
    saves it, one line gives the command that resumes the whole comparison, exit 143; that command
    finishes both runs as an uninterrupted comparison trains them, bit for bit."""
    from examples.pancreas.compare import compare

    cfg = preset("tiny", steps=24, checkpoint_every=3, val_every=0, deterministic=True)
    whole = tmp_path / "uninterrupted"
    compare(cfg, whole, device="cpu", progress=False, isolate=False)
    out = tmp_path / "run"
    args = ["compare", *SIGNAL_RUN, "--no-progress", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "examples.pancreas", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)  # fmt: skip
    log = out / "attention" / "log.csv"
    deadline = time.monotonic() + 200
    while proc.poll() is None and time.monotonic() < deadline:  # the attention run's first log row
        if log.is_file() and len(log.read_text().splitlines()) > 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=200)
    assert proc.returncode == 143, stderr[-3000:]
    step = load_checkpoint(out / "attention" / "checkpoint.pt")["step"]
    assert 3 <= step < 24 and not (out / "unet").exists() and not (out / "comparison.json").exists()
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"SIGTERM: training stopped after step {step} of 24, saved in {out / 'attention' / 'checkpoint.pt'}; "
        f"resume the comparison with: python -m examples.pancreas {' '.join(args)} --resume"
    )
    again = subprocess.run([sys.executable, "-m", "examples.pancreas", *args, "--resume"], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    for model in ("attention", "unet"):
        _equal_runs(whole / model, out / model)
    ours, theirs = (json.loads((folder / "comparison.json").read_text()) for folder in (out, whole))
    for model in ("attention", "unet"):
        assert ours["results"][model]["cases"] == theirs["results"][model]["cases"]


def test_a_comparison_folder_is_resumed_or_replaced_only_when_asked(tmp_path, no_data):
    from examples.pancreas.compare import compare

    (tmp_path / "attention").mkdir()
    (tmp_path / "attention" / "checkpoint.pt").write_bytes(b"a run")
    with pytest.raises(CheckpointError, match=r"already holds a run \(checkpoint.pt\); pass --resume to continue the comparison, --overwrite"):
        compare(preset("tiny"), tmp_path, device="cpu", progress=False, isolate=False)
    with pytest.raises(ValueError, match=r"resume continues the runs in the folder and overwrite replaces them: give one of them"):
        compare(preset("tiny"), tmp_path, resume=True, overwrite=True, device="cpu", progress=False, isolate=False)


def test_stop_signals_restore_the_handlers_and_a_second_signal_acts_at_once():
    from examples.pancreas.runtime import stop_signals

    saved = signal.signal(signal.SIGINT, signal.default_int_handler), signal.getsignal(signal.SIGTERM)
    try:
        with stop_signals() as stop:
            assert not stop
            signal.raise_signal(signal.SIGINT)
            assert stop.signum == signal.SIGINT  # recorded, nothing raised
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)  # the second one: Python's own handler
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (signal.default_int_handler, saved[1])
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with stop_signals() as stop:
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # an ignored signal stays ignored
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


# ----------------------------------------------------------------------------- SIGKILL during a checkpoint write

KILLED_WRITER = """
import os, signal, sys
from attention_gates.files import atomic_write
from examples.pancreas import train as train_module
from examples.pancreas.config import preset

real = train_module.save_checkpoint

def save(state, path):
    if state["step"] == 4 and path.name == "checkpoint.pt":  # killed half-way through writing it
        atomic_write(path, lambda f: (f.write(b"half a checkpoint"), f.flush(), os.kill(os.getpid(), signal.SIGKILL)))
    real(state, path)

train_module.save_checkpoint = save
train_module.train(preset("tiny", steps=6, checkpoint_every=2, val_every=0, deterministic=True), sys.argv[1], progress=False)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_kill_during_a_checkpoint_write_leaves_nothing_that_disagrees(tmp_path, tiny_cases):
    cfg = preset("tiny", steps=6, checkpoint_every=2, val_every=0, deterministic=True)
    train(cfg, tmp_path / "full", progress=False, cases=tiny_cases)
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=250)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    (stale,) = out.glob(".checkpoint.pt.*.tmp")
    assert stale.read_bytes() == b"half a checkpoint"
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2  # the last complete one
    assert len(read_log(out / "log.csv", 10**9)) == 4  # the log, written first, is ahead of it
    own = out / f".log.csv.{os.getpid()}.0123abcd.tmp"  # a live writer's file is not stale
    own.write_bytes(b"being written")
    train(cfg, out, resume=True, progress=False, cases=tiny_cases)
    assert not stale.exists() and own.exists()
    _equal_runs(tmp_path / "full", out)  # the log was cut back to step 2, steps 3-6 redone


# ----------------------------------------------------------------------------- a damaged best.pt


class _Interrupt(Exception):
    pass


def test_resume_with_an_unreadable_best_checkpoint_warns_and_rewrites_it(tmp_path, tiny_cases, monkeypatch):
    from examples.pancreas import train as train_module

    scores = iter([0.5, 0.2, 0.3, 0.5, 0.2, 0.3])  # the full run, then the cut one and its resume
    monkeypatch.setattr(train_module, "validation_dice", lambda *a, **k: next(scores))
    cfg = preset("tiny", steps=6, val_every=2, checkpoint_every=100, deterministic=True)
    full = train(cfg, tmp_path / "full", progress=False, cases=tiny_cases)

    def crash(step, loss):
        if step == 4:  # after the checkpoint of step 4; the best is step 2's
            raise _Interrupt

    out = tmp_path / "cut"
    with pytest.raises(_Interrupt):
        train(cfg, out, progress=False, cases=tiny_cases, on_step=crash)
    data = (out / "best.pt").read_bytes()
    (out / "best.pt").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match=r"cannot read checkpoint .*best\.pt.*step 2, validation Dice 0\.5000\) is lost.*"
                                         r"resumes from checkpoint\.pt, and best\.pt will be rewritten at the next validation"):  # fmt: skip
        resumed = train(cfg, out, resume=True, progress=False, cases=tiny_cases)
    assert resumed["losses"] == full["losses"]  # the training itself is unchanged
    assert resumed["best"] == {"step": 6, "val_dice": 0.3}  # the next validation's
    best = load_checkpoint(out / "best.pt")
    assert best["step"] == 6 and best["val_dice"] == 0.3
    last = load_checkpoint(out / "checkpoint.pt")
    for k, v in last["model"].items():
        assert torch.equal(best["model"][k], v), k


# ----------------------------------------------------------------------------- a bad case in the test split


def _msd_with_a_bad_test_case(root: Path, fault: str) -> tuple[Path, str, Path]:
    write_msd(root, n=5, spacing=(4.0, 4.0, 4.0))
    (test_case,) = split_cases(preset("tiny", data=str(root)), find_cases(root))["test"]
    label, image = Path(test_case["label"]), Path(test_case["image"])
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 20.0]
    if fault == "shape":
        write_nifti(label, cube_label()[:, :, :-1], affine)
    elif fault == "values":
        bad = cube_label()
        bad[0, 0, 0] = 7
        write_nifti(label, bad, affine)
    elif fault == "truncated":
        data = label.read_bytes()
        label.write_bytes(data[: len(data) // 2])
    elif fault == "image cut after its header":  # a download cut short: the header reads, the voxels do not
        data = image.read_bytes()
        image.write_bytes(data[: len(data) * 2 // 3])
        return root, test_case["case_id"], image
    else:
        label.write_text("not a NIfTI file")
    return root, test_case["case_id"], label


@pytest.mark.parametrize(
    "fault, message",
    [
        ("shape", r"geometries disagree after orientation to RAS \(different shapes, tolerance 0\.1 mm\): image shape \(12, 10, 8\), label shape \(12, 10, 7\)"),
        ("values", r"has values 7; expected only \[0, 1, 2\]"),
        ("truncated", r"is not a NIfTI file: its gzip stream is cut short or damaged \(EOFError"),
        ("text", r"is not a NIfTI file: it is not gzip-compressed, as its \.gz name says"),
        ("image cut after its header", r"image .* cannot be read in full: its gzip stream is cut short or damaged after \d+ bytes of data \(EOFError"),
    ],
)
def test_a_bad_test_case_is_refused_before_the_first_step(tmp_path, capsys, monkeypatch, fault, message):
    from examples.pancreas import train as train_module

    root, case_id, bad_file = _msd_with_a_bad_test_case(tmp_path / "msd", fault)
    monkeypatch.setattr(train_module, "split_at_first_random", lambda *a: pytest.fail("the cache was built before the check"))
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(root), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: case {case_id}: ") and str(bad_file) in err
    assert re.search(message, err), err
    assert not out.exists()  # nothing written, nothing trained


# ----------------------------------------------------------------------------- arguments that cannot work


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if a command reads any case before its arguments are checked."""
    from examples.pancreas import compare as compare_module

    def read(*a, **k):
        raise AssertionError("data were read before the arguments were checked")

    monkeypatch.setattr(compare_module, "load_cases", read)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()[len("error: "):]


def test_out_that_is_a_file_or_under_a_file(tmp_path, capsys, no_data):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    assert main(["train", "--preset", "tiny", "--out", str(file)]) == 2
    assert _one_line_error(capsys) == f"--out: expected a folder (existing or new); got {file}, which is a file"
    assert main(["demo", "--out", str(file / "run")]) == 2
    assert _one_line_error(capsys) == f"--out: expected a folder that can be made; got {file / 'run'}, but {file} is a file"
    assert file.read_text() == "mine"


def test_out_that_cannot_be_written_is_refused(tmp_path, capsys, no_data, monkeypatch):
    """A folder this process cannot write in (the probe file fails: permissions, a read-only file
    system); the real permission case is the next test (and predict's in test_pancreas_predict)."""
    from examples.pancreas import arguments

    monkeypatch.setattr(arguments, "write_problem", lambda folder: f"cannot create a file in {folder} (Read-only file system)")
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "run")]) == 2
    assert _one_line_error(capsys) == (
        f"--out: expected a folder this process can write in; got {tmp_path / 'run'}: cannot create a file in {tmp_path} (Read-only file system)"
    )


@pytest.mark.timeout(120)
def test_train_into_a_read_only_folder_is_refused_before_anything_is_read(tmp_path):
    """Real permissions (``chmod 555``, held for root too by :func:`unprivileged`): ``train``
    exits 2 with one line naming ``--out``, creates nothing and reads no data (the data folder
    given does not exist, so reading it would fail with another message)."""
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    cmd = [*unprivileged(), sys.executable, "-m", "examples.pancreas", "train", "--preset", "tiny",
           "--data", str(tmp_path / "no-such-data"), "--out", str(parent / "run"), "--no-progress"]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=100)
    finally:
        parent.chmod(0o755)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: --out: expected a folder this process can write in; got {parent / 'run'}: {parent} is not writable by this user"
    ]
    assert proc.stdout == "" and list(parent.iterdir()) == []


def test_device_the_machine_lacks(tmp_path, capsys, no_data):
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--device", "cuda:99"]) == 2
    assert _one_line_error(capsys).startswith("--device: expected a device this machine has; got 'cuda:99', but ")
    assert main(["demo", "--out", str(tmp_path / "run"), "--device", "gpu"]) == 2
    assert _one_line_error(capsys) == "--device: expected cpu, cuda or cuda:N; got 'gpu'"
    assert not (tmp_path / "run").exists()


def test_a_backend_that_cannot_run_on_the_device(tmp_path, capsys, no_data, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--device", "cpu", "--backend", "triton"]) == 2
    assert _one_line_error(capsys) == (
        "--backend triton: expected a backend that can train the gates on cpu; the library says: "
        "x is on the CPU: Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1)"
    )
    assert not (tmp_path / "run").exists()


def test_a_unet_has_no_gates_whose_backend_could_fail(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["train", "--preset", "tiny", "--model", "unet", "--backend", "triton", "--device", "cpu", "--out", str(tmp_path),
                 "--steps", "1", "--no-progress"]) == 0  # fmt: skip
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1


def test_checkpoint_a_run_folder_means_its_best_checkpoint(tmp_path, capsys, tiny_cases):
    import json

    run = tmp_path / "run"
    train(preset("tiny", steps=2, val_every=2), run, progress=False, cases=tiny_cases)
    assert main(["evaluate", "--checkpoint", str(run)]) == 0
    assert json.loads((run / "eval" / "results.json").read_text())["checkpoint"] == str(run / "best.pt")
    (run / "best.pt").unlink()  # a run without validation has none
    assert main(["evaluate", "--checkpoint", str(run), "--out", str(tmp_path / "eval2")]) == 0
    assert json.loads((tmp_path / "eval2" / "results.json").read_text())["checkpoint"] == str(run / "checkpoint.pt")
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", "--checkpoint", str(empty)]) == 2
    assert _one_line_error(capsys) == (
        f"--checkpoint: expected a checkpoint file or a run folder holding best.pt or checkpoint.pt; got the folder {empty}, which holds neither"
    )
    assert main(["predict", "--checkpoint", str(tmp_path / "none.pt"), "--input", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert _one_line_error(capsys) == f"--checkpoint: expected a checkpoint file or a run folder; got {tmp_path / 'none.pt'}, which does not exist"
    assert not (tmp_path / "o").exists() and not (empty / "eval").exists()

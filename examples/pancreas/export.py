"""A trained checkpoint, exported for deployment and checked: ``python -m examples.pancreas export``.

The model the checkpoint rebuilds (:func:`~examples.pancreas.checkpoints.model_from_checkpoint`:
eval mode, the gates' default backend, which tracing and export record as the reference math)
goes through :mod:`attention_gates.deploy` in one of its formats:

- ``torchscript``: traced, ``torch.jit.load`` reads it (MONAI Deploy, MONAI bundles); any size;
- ``program``: ``torch.export`` with dynamic batch and sizes (``torch.export.load``, or an
  AOTInductor package compiled from it); sizes above ``2^(depth - 1)`` per axis;
- ``onnx``: ONNX with dynamic batch and sizes (ONNX Runtime, TensorRT); any size.

The exported model takes ``image``, ``Tensor[N, 1, X, Y, Z]`` float32, preprocessed as the run
was (resampled to the config's spacing, the HU window scaled to [0, 1]: what
:func:`examples.pancreas.transforms.image_transforms` gives), and returns ``logits``,
``Tensor[N, 2, X, Y, Z]`` (softmax and argmax are the caller's; ``predict`` does the same);
``attention=True`` adds the Attention U-Net's maps, ``attention_level<l>``.

It is exported with a batch of 2 at ``2^(depth - 1) + 1`` voxels per axis and checked, before
it is put in place, against eager PyTorch on a random volume the size of a preprocessed phantom
case (another size, batch 1). A file is written only when the check passes, and an existing one
is replaced only when asked.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from attention_gates import deploy
from attention_gates.deploy import FORMATS, TOLERANCE

from .arguments import ArgumentError, resolve_checkpoint
from .checkpoints import load_checkpoint, model_from_checkpoint
from .config import Config

__all__ = ["export_checkpoint", "Exported", "default_output", "FORMATS"]

_WRITE = {"torchscript": deploy.export_torchscript, "program": deploy.export_program, "onnx": deploy.export_onnx}
_CHECK = {"torchscript": deploy.check_torchscript, "program": deploy.check_program, "onnx": deploy.check_onnx}
_KIND = {"torchscript": "TorchScript (traced)", "program": "torch.export program", "onnx": "ONNX"}


@dataclass(frozen=True)
class Exported:
    """What :func:`export_checkpoint` wrote and how it was checked.

    Attributes:
        path: the file written.
        format: one of :data:`FORMATS`.
        checkpoint: the checkpoint it holds the weights of.
        arch: ``"AttentionUNet"`` or ``"UNet"``.
        step: the checkpoint's training step.
        outputs: the exported model's outputs, ``logits`` first.
        smallest: the smallest spatial size per axis the exported model takes.
        checked_shape: the random input it was checked on, ``(N, 1, X, Y, Z)``.
        max_difference: the largest absolute difference from eager PyTorch there.
    """

    path: Path
    format: str
    checkpoint: Path
    arch: str
    step: int
    outputs: tuple[str, ...]
    smallest: int
    checked_shape: tuple[int, ...]
    max_difference: float

    def summary(self) -> str:
        """Where it wrote what, what the model takes and returns, and the check, in four lines."""
        sizes = "any X, Y, Z" if self.smallest == 1 else f"X, Y, Z of at least {self.smallest}"
        return "\n".join([
            f"wrote {self.path} ({self.path.stat().st_size / 2**20:.1f} MiB, {_KIND[self.format]}): {self.arch} of "
            f"{self.checkpoint}, step {self.step}",
            f"input 'image': Tensor[N, 1, X, Y, Z] float32, any N, {sizes}, preprocessed as the run was (its spacing, "
            "HU window scaled to [0, 1])",
            f"outputs: {', '.join(repr(name) for name in self.outputs)}; 'logits' is Tensor[N, 2, X, Y, Z]",
            f"checked against eager PyTorch on a random Tensor{list(self.checked_shape)}: max |difference| "
            f"{self.max_difference:.2e}",
        ])  # fmt: skip


def default_output(checkpoint: Union[str, os.PathLike], format: str) -> Path:
    """Beside the checkpoint: ``best.onnx``, ``best.pt2`` (program) or ``best.torchscript.pt`` for ``best.pt``."""
    checkpoint = Path(checkpoint)
    suffix = ".torchscript.pt" if format == "torchscript" else FORMATS[format]
    return checkpoint.with_name(checkpoint.stem + suffix)


def _check_volume(cfg: Config, example: tuple[int, ...]) -> torch.Tensor:
    """A random preprocessed volume, batch 1, the size of a phantom case resampled to the run's spacing
    (one voxel more per axis where that is the example's size)."""
    size = tuple(round(n * s / t) for n, s, t in zip(cfg.phantom_shape, cfg.phantom_spacing, cfg.spacing))
    if size == example:
        size = tuple(s + 1 for s in size)
    return torch.rand(1, 1, *size, generator=torch.Generator().manual_seed(0))


def export_checkpoint(checkpoint: Union[str, os.PathLike], format: str, out: Optional[Union[str, os.PathLike]] = None,
                      overwrite: bool = False, attention: bool = False) -> Exported:  # fmt: skip
    """Export a checkpoint's model in ``format``, check it against eager PyTorch, then write it.

    Args:
        checkpoint: a checkpoint file, or a run folder (its ``best.pt``, else its ``checkpoint.pt``).
        format: ``"torchscript"``, ``"program"`` or ``"onnx"``.
        out: the file to write (default :func:`default_output`).
        overwrite: replace an existing ``out``.
        attention: also return an Attention U-Net's attention maps.

    Raises:
        ArgumentError: a checkpoint that is not there, an ``out`` that is a folder or exists
            (without ``overwrite``), ``attention`` for a U-Net, ONNX without its packages; checked
            before the model is exported.
        CheckpointError: the checkpoint cannot be read or built.
        attention_gates.deploy.ExportCheckError: the exported model fixed a size, cannot run the
            check's volume, or differs from eager PyTorch (nothing is written).
    """
    if format not in FORMATS:
        raise ArgumentError(f"--format: expected one of {', '.join(FORMATS)}; got {format!r}")
    path = resolve_checkpoint(checkpoint)
    try:
        destination = deploy.check_output(out if out is not None else default_output(path, format), overwrite, format)
        if format == "onnx":
            deploy.require_export_packages()
    except (ValueError, FileExistsError) as e:
        raise ArgumentError(f"--out: {e}") from None
    except ImportError as e:
        raise ArgumentError(f"--format onnx: {e}") from None
    ckpt = load_checkpoint(path)
    cfg = Config.from_dict(ckpt["args"])
    model = model_from_checkpoint(ckpt)
    try:
        outputs = deploy.output_names(model, attention)
    except ValueError as e:
        raise ArgumentError(f"--attention: {e}") from None
    multiple = 2 ** (model.depth - 1)
    example = torch.rand(2, 1, *(multiple + 1,) * 3, generator=torch.Generator().manual_seed(1))
    volume = _check_volume(cfg, tuple(example.shape[2:]))
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=f".{destination.name}.") as tmp:
        written = _WRITE[format](model, example, Path(tmp) / destination.name, attention=attention)
        difference = _CHECK[format](written, model, volume, attention=attention, tolerance=TOLERANCE)
        os.replace(written, destination)
    return Exported(
        path=destination, format=format, checkpoint=path, arch=ckpt["config"]["arch"], step=int(ckpt["step"]),
        outputs=outputs, smallest=multiple + 1 if format == "program" else 1, checked_shape=tuple(volume.shape),
        max_difference=difference,
    )  # fmt: skip

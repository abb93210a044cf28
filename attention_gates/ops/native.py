"""The ``cpu`` backend's native kernel: the gate's output product with its epilogue, in one pass.

:func:`rows_product` computes, per row ``r`` of a channels-last tensor (one voxel's channels),

    out[r] = act(bias + sum_h alpha[r, h] * (A_h @ x[r]))

which is ``W``'s product with the gate's epilogue ``alpha * (W0 x) + b`` (one head), or the folded
multi-head block ``relu(c + sum_i alpha_i * (A_i x))``, without writing the product and reading it
back; :func:`planes_product` computes the same on contiguous tensors, and :func:`rows_stats`
and :func:`backward_rows` serve the backend's training with batch statistics. The kernels
(``csrc/gate_cpu.c``) keep a tile of voxels x outputs in registers, are vectorised for the
machine's SIMD (over output channels for rows, over voxels for planes) and run on PyTorch's own
OpenMP threads.

It is compiled on first use with the machine's C compiler (``$CC``, else ``cc``;
``-O3 -march=native -fopenmp``, plus ``$ATTENTION_GATES_NATIVE_CFLAGS``) into a cache directory (``$ATTENTION_GATES_CACHE``, else
``$XDG_CACHE_HOME/attention_gates`` or ``~/.cache/attention_gates``), once per source, compiler
and CPU, in well under a second. Nothing is downloaded. It is used only where PyTorch runs its
CPU kernels on a GNU OpenMP runtime of its own (the Linux wheels), which the library links to,
so that both share one thread pool. Without a compiler, on other platforms, or with
``ATTENTION_GATES_NATIVE=0``, :func:`available` is ``False`` (:func:`unavailable_reason` says
why) and the ``cpu`` backend computes the same with PyTorch operations.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["available", "unavailable_reason", "vector_width", "applies", "disabled", "rows_product", "planes_product", "rows_stats", "backward_rows"]

SOURCE = Path(__file__).with_name("csrc") / "gate_cpu.c"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
_lock = threading.Lock()
_state: dict = {}  # "lib" (ctypes.CDLL or None) and "reason", once tried
_disabled = [0]  # depth of nested disabled() blocks


def _torch_libgomp() -> Optional[Path]:
    """PyTorch's own GNU OpenMP runtime (``torch/lib/libgomp*.so*``) when its CPU kernels run on OpenMP."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    found = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return found[0] if found else None


def _cache_dir() -> Path:
    if os.environ.get("ATTENTION_GATES_CACHE"):
        return Path(os.environ["ATTENTION_GATES_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attention_gates"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(sorted(set(lines)))


def _build(cc: str, gomp: Path) -> Path:
    """Compile the kernel into the cache (atomically: a temporary file renamed) and return the library's path.

    ``$ATTENTION_GATES_NATIVE_CFLAGS`` adds compiler flags (for example ``-mno-avx512f`` for the
    8-wide build on an AVX-512 machine)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    flags = [*_FLAGS, *shlex.split(os.environ.get("ATTENTION_GATES_NATIVE_CFLAGS", ""))]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(flags), str(gomp), _cpu_signature()]).encode()).hexdigest()[:20]
    target = _cache_dir() / f"gate_cpu-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        # -fopenmp links against a libgomp.so.1; the run-time path makes it PyTorch's (already loaded, so shared)
        cmd = [cc, *flags, str(SOURCE), "-o", tmp, f"-Wl,-rpath,{gomp.parent}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> Optional[ctypes.CDLL]:
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, reason = None, None
        cc = os.environ.get("CC") or "cc"
        gomp = _torch_libgomp()
        if os.environ.get("ATTENTION_GATES_NATIVE", "1") == "0":
            reason = "disabled by ATTENTION_GATES_NATIVE=0"
        elif not sys.platform.startswith("linux"):
            reason = f"the native kernel is built on Linux only (this is {sys.platform})"
        elif gomp is None:
            reason = "this PyTorch does not run its CPU kernels on a GNU OpenMP runtime of its own (torch/lib/libgomp*)"
        elif shutil.which(cc) is None:
            reason = f"no C compiler ({cc!r} is not on PATH; set CC)"
        else:
            try:
                lib = ctypes.CDLL(str(_build(cc, gomp)))
                P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
                lib.gate_rows.argtypes = [P, L, I, P, I, I, P, L, P, I, P, L, L, I]
                lib.gate_rows.restype = None
                lib.gate_planes.argtypes = [P, L, I, P, I, I, P, L, P, I, P, L, L, I]
                lib.gate_planes.restype = None
                lib.gate_backward_rows.argtypes = [P, L, P, L, I, P, P, P, P, P, P, L, I]
                lib.gate_backward_rows.restype = None
                lib.gate_rows_stats.argtypes = [P, L, I, P, I, P, P, L, I]
                lib.gate_rows_stats.restype = None
                lib.gate_vector_width.restype = I
            except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as e:
                lib, reason = None, f"building or loading {SOURCE.name} failed: {e}"
                warnings.warn(f"attention_gates: the cpu backend's native kernel is unavailable ({reason}); "
                              "using PyTorch operations instead", RuntimeWarning, stacklevel=3)  # fmt: skip
        _state.update(lib=lib, reason=reason)
        return lib


def available() -> bool:
    """Whether the native kernel is built and loaded (building it on the first call)."""
    return _load() is not None


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is ``False``, or ``None``."""
    _load()
    return _state["reason"]


def _require() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the native kernel is unavailable: {_state['reason']}")
    return lib


def vector_width() -> int:
    """Floats per SIMD vector of the kernel (16 with AVX-512, else 8): output channel counts
    must be multiples of it."""
    return _require().gate_vector_width()


def _check(what: str, *tensors: Optional[Tensor]) -> None:
    for t in tensors:
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise ValueError(f"{what} takes float32 CPU tensors, got {t.dtype} on {t.device}")


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def rows_product(
    x: Tensor, A: Tensor, *, alpha: Optional[Tensor] = None, bias: Optional[Tensor] = None, relu: bool = False
) -> Tensor:
    """``out[r] = act(bias + sum_h alpha[n, h, s] * (A_h @ x[r]))`` for every row ``r = (n, s)``.

    ``x``: ``Tensor[N, *S, C]`` (a channels-last tensor permuted; rows dense, the batch may be
    strided); ``A``: ``Tensor[H * Co, C]``, the heads' matrices stacked; ``alpha``:
    ``Tensor[N, H, *S]`` contiguous, or ``None`` (then ``H = 1`` and no scaling); ``bias``:
    ``Tensor[Co]``; ``relu``: the activation. All float32 on the CPU, ``Co`` a multiple of
    :func:`vector_width`. Returns ``Tensor[N, *S, Co]``, contiguous.
    """
    lib = _require()
    _check("rows_product", x, A, alpha, bias)
    n, c, spatial = x.shape[0], x.shape[-1], tuple(x.shape[1:-1])
    s = math.prod(spatial)
    heads = 1 if alpha is None else alpha.shape[1]
    co = A.shape[0] // heads
    vl = lib.gate_vector_width()
    if co % vl or A.shape[0] % heads:  # the kernel stores whole vectors
        raise ValueError(f"rows_product needs Co a multiple of {vl}, got A {list(A.shape)} for {heads} head(s)")
    if A.shape[1] != c or (bias is not None and bias.shape != (co,)) or (alpha is not None and tuple(alpha.shape) != (n, heads, *spatial)):
        raise ValueError(
            f"rows_product: x {list(x.shape)}, A {list(A.shape)}, alpha {None if alpha is None else list(alpha.shape)} and "
            f"bias {None if bias is None else list(bias.shape)} do not fit (A = Tensor[H * Co, C], alpha = Tensor[N, H, *S], bias = Tensor[Co])"
        )
    alpha = None if alpha is None else alpha.contiguous()
    bias = None if bias is None else bias.contiguous()
    rows = x.reshape(n * s, c)  # a view of a channels-last tensor's rows
    Wt = A.reshape(heads, co, c).transpose(1, 2).contiguous()  # [H, C, Co]: the k loop reads Co-vectors
    out = torch.empty((n, *spatial, co), dtype=x.dtype, device=x.device)
    lib.gate_rows(
        _ptr(rows), rows.stride(0), c, _ptr(Wt), heads, co, _ptr(alpha), s,
        _ptr(bias), int(relu), _ptr(out), co, n * s, torch.get_num_threads(),
    )  # fmt: skip
    return out


def planes_product(
    x: Tensor, A: Tensor, *, alpha: Optional[Tensor] = None, bias: Optional[Tensor] = None, relu: bool = False
) -> Tensor:
    """:func:`rows_product` on contiguous tensors: ``out[n, :, s] = act(bias + sum_h alpha[n, h, s] * (A_h @ x[n, :, s]))``.

    ``x``: ``Tensor[N, C, *S]`` contiguous; ``A``: ``Tensor[H * Co, C]``; ``alpha``: ``Tensor[N, H, *S]``
    or ``None`` (``H = 1``, no scaling); ``bias``: ``Tensor[Co]``. Any ``Co``. Returns
    ``Tensor[N, Co, *S]``, contiguous.
    """
    lib = _require()
    _check("planes_product", x, A, alpha, bias)
    n, c, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
    heads = 1 if alpha is None else alpha.shape[1]
    co = A.shape[0] // heads
    if A.shape[0] % heads or A.shape[1] != c or (bias is not None and bias.shape != (co,)) or (alpha is not None and tuple(alpha.shape) != (n, heads, *spatial)):
        raise ValueError(
            f"planes_product: x {list(x.shape)}, A {list(A.shape)}, alpha {None if alpha is None else list(alpha.shape)} and "
            f"bias {None if bias is None else list(bias.shape)} do not fit (A = Tensor[H * Co, C], alpha = Tensor[N, H, *S], bias = Tensor[Co])"
        )
    x = x.contiguous()
    A = A.contiguous()  # [H, Co, C]: each channel's weights in a row
    alpha = None if alpha is None else alpha.contiguous()
    bias = None if bias is None else bias.contiguous()
    s = math.prod(spatial)
    out = torch.empty((n, co, *spatial), dtype=x.dtype, device=x.device)
    lib.gate_planes(
        _ptr(x), c * s, c, _ptr(A), heads, co, _ptr(alpha), s,
        _ptr(bias), int(relu), _ptr(out), co * s, n, torch.get_num_threads(),
    )  # fmt: skip
    return out


def rows_stats(x: Tensor, W: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """The batch statistics of the gate's output transform in training, without writing it.

    Per output channel ``o``: ``sum_r v[r, o]`` and ``sum_r v[r, o]^2`` with
    ``v[r] = alpha[r] * (W @ x[r])``, accumulated in float64.

    ``x``: ``Tensor[N, *S, C]`` (a channels-last tensor permuted; rows dense); ``W``:
    ``Tensor[Co, C]``; ``alpha``: ``Tensor[N, 1, *S]``. float32 on the CPU, ``Co`` a multiple of
    :func:`vector_width`. Returns ``(sum, sum_of_squares)``, each ``Tensor[Co]`` of float64.
    """
    lib = _require()
    _check("rows_stats", x, W, alpha)
    n, c, spatial = x.shape[0], x.shape[-1], tuple(x.shape[1:-1])
    co, vl = W.shape[0], lib.gate_vector_width()
    if co % vl:
        raise ValueError(f"rows_stats needs Co a multiple of {vl}, got W {list(W.shape)}")
    if W.shape[1] != c or tuple(alpha.shape) != (n, 1, *spatial):
        raise ValueError(f"rows_stats: x {list(x.shape)}, W {list(W.shape)} and alpha {list(alpha.shape)} do not fit "
                         "(W = Tensor[Co, C], alpha = Tensor[N, 1, *S])")  # fmt: skip
    s = math.prod(spatial)
    rows = x.reshape(n * s, c)  # a view of a channels-last tensor's rows
    Wt, alpha = W.t().contiguous(), alpha.contiguous()
    threads = torch.get_num_threads()
    part = torch.zeros((threads, 2, co), dtype=torch.float64)
    lib.gate_rows_stats(_ptr(rows), rows.stride(0), c, _ptr(Wt), co, _ptr(alpha), _ptr(part), n * s, threads)
    total = part.sum(0)
    return total[0], total[1]


def backward_rows(dy: Tensor, x: Tensor, A1: Tensor, A2: Tensor, alpha: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """The gate's backward through its output transform with batch statistics, in one pass.

    Per row ``r`` of channels-last tensors: ``h[r] = A1 @ dy[r] + alpha[r] * (A2 @ x[r]) + bias``
    and ``hx[r] = h[r] . x[r]``.

    ``dy``, ``x``: ``Tensor[N, *S, C]`` (channels-last tensors permuted; rows dense, the batch may
    be strided); ``A1``, ``A2``: ``Tensor[C, C]``; ``alpha``: ``Tensor[N, 1, *S]``; ``bias``:
    ``Tensor[C]``. float32 on the CPU, ``C`` a multiple of :func:`vector_width`. Returns
    ``(h: Tensor[N, *S, C], hx: Tensor[N, 1, *S])``, contiguous.
    """
    lib = _require()
    _check("backward_rows", dy, x, A1, A2, alpha, bias)
    n, c, spatial = x.shape[0], x.shape[-1], tuple(x.shape[1:-1])
    vl = lib.gate_vector_width()
    if c % vl:
        raise ValueError(f"backward_rows needs C a multiple of {vl}, got x {list(x.shape)}")
    if (dy.shape != x.shape or A1.shape != (c, c) or A2.shape != (c, c) or tuple(alpha.shape) != (n, 1, *spatial)
            or bias.shape != (c,)):  # fmt: skip
        raise ValueError(
            f"backward_rows: dy {list(dy.shape)}, x {list(x.shape)}, A1 {list(A1.shape)}, A2 {list(A2.shape)}, alpha "
            f"{list(alpha.shape)} and bias {list(bias.shape)} do not fit (dy = x = Tensor[N, *S, C], A = Tensor[C, C], "
            "alpha = Tensor[N, 1, *S], bias = Tensor[C])"
        )
    s = math.prod(spatial)
    dy_rows, x_rows = dy.reshape(n * s, c), x.reshape(n * s, c)  # views of channels-last tensors' rows
    A1t, A2t = A1.t().contiguous(), A2.t().contiguous()  # [k, o]: the k loop reads output vectors
    alpha, bias = alpha.contiguous(), bias.contiguous()
    h = torch.empty((n, *spatial, c), dtype=x.dtype, device=x.device)
    hx = torch.empty((n, 1, *spatial), dtype=x.dtype, device=x.device)
    lib.gate_backward_rows(
        _ptr(dy_rows), dy_rows.stride(0), _ptr(x_rows), x_rows.stride(0), c, _ptr(A1t), _ptr(A2t),
        _ptr(alpha), _ptr(bias), _ptr(h), _ptr(hx), n * s, torch.get_num_threads(),
    )  # fmt: skip
    return h, hx


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block the ``cpu`` backend does not use the kernel (:func:`applies` is ``False``):
    to compare with its PyTorch path, or to rule the kernel out. Process-wide, not per thread."""
    _disabled[0] += 1
    try:
        yield
    finally:
        _disabled[0] -= 1


def applies(t: Tensor, out_channels: Sequence[int]) -> bool:
    """Whether the kernel takes ``t`` (``Tensor[N, C, *S]``, 2 or 3 spatial dims): float32, outside
    :func:`torch.compile`, dispatch modes and :func:`disabled`, the kernel available, and either
    contiguous (:func:`planes_product`) or dense channels-last with every count in
    ``out_channels`` a multiple of :func:`vector_width` (:func:`rows_product`)."""
    if _disabled[0] or t.dim() not in (4, 5) or t.dtype != torch.float32 or t.device.type != "cpu" or t.shape[1] < 2:
        return False
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or not available():
        return False
    if t.is_contiguous():
        return True
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    vl = vector_width()
    return t.is_contiguous(memory_format=fmt) and all(co % vl == 0 for co in out_channels)

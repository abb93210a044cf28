"""Implementations of the grid attention gate and the choice between them.

:mod:`~attention_gates.ops.reference` holds the reference math and the gate's argument types,
:mod:`~attention_gates.ops.dispatch` the choice, :mod:`~attention_gates.ops.support` what the
implementations support, :mod:`~attention_gates.ops.measured` the measurements the choice
follows, :mod:`~attention_gates.ops.cpu_gate` and :mod:`~attention_gates.ops.triton` the fused
implementations, :mod:`~attention_gates.ops.onednn` the CPU convolution paths and
:mod:`~attention_gates.ops.layout` the memory layouts they read.
"""

from . import dispatch, measured
from .dispatch import BACKENDS, check_name, get_backend, not_supported_reasons, use_backend
from .reference import GateOptions, GateWeights
from .support import BackendUnavailableError

__all__ = ["BACKENDS", "BackendUnavailableError", "check_name", "GateOptions", "GateWeights", "get_backend", "not_supported_reasons", "use_backend"]

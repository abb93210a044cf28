"""Implementations of the grid attention gate and the choice between them.

:mod:`~attention_gates.ops.reference` holds the reference math and the gate's argument types,
:mod:`~attention_gates.ops.dispatch` the choice, :mod:`~attention_gates.ops.measured` the
measurements it follows, and ``cpu`` and ``triton`` the fused implementations.
"""

from . import dispatch, measured
from .dispatch import BACKENDS, BackendUnavailableError, check_name, get_backend, not_supported_reasons, use_backend
from .reference import GateOptions, GateWeights

__all__ = ["BACKENDS", "BackendUnavailableError", "check_name", "GateOptions", "GateWeights", "get_backend", "not_supported_reasons", "use_backend"]

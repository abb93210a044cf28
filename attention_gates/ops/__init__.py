"""Implementations of the grid attention gate and the choice between them."""

from .dispatch import BACKENDS, BackendUnavailableError, get_backend, not_supported_reasons, use_backend

__all__ = ["BACKENDS", "BackendUnavailableError", "get_backend", "not_supported_reasons", "use_backend"]

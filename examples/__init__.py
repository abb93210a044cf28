"""Worked examples for attention-gates (not part of the library API)."""

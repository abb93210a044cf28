"""Attention gates inside other frameworks, each behind its own optional extra.

- :mod:`attention_gates.integrations.nnunet`: nnU-Net v2 (``pip install 'attention-gates[nnunet]'``).
"""

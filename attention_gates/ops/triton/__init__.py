"""Fused Triton kernels of the grid attention gate (optional: ``pip install 'attention-gates[triton]'``).

``support`` says what the kernels take without importing Triton; ``kernels`` holds the
``@triton.jit`` functions, ``launch`` the passes over plain tensors, ``autograd`` the
``torch.library`` custom ops that make them a differentiable, compilable op.
"""

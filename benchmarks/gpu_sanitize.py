"""A small fused-gate forward + backward for ``compute-sanitizer`` (memcheck): every kernel of
the triton backend runs once, on odd sizes with masked tails, in float32 and bfloat16."""
import torch

from attention_gates import GridAttentionGate3D

for dtype in (torch.float32, torch.bfloat16):
    gate = GridAttentionGate3D(20, 36, 12, subsample_factor=(2, 2, 1), backend="triton").cuda().train()
    x = torch.randn(2, 20, 9, 11, 7, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(2, 36, 4, 5, 7, device="cuda", dtype=dtype, requires_grad=True)
    with torch.autocast("cuda", dtype, enabled=dtype != torch.float32):
        out, alpha = gate(x, g)
    (out.float().square().mean() + alpha.float().mean()).backward()
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all() and torch.isfinite(g.grad).all()
print("fused forward + backward ran (float32, bfloat16)")

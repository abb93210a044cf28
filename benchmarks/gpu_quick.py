"""Quick GPU check of the fused gate at the paper model's gate shapes (batch 2, 160x160x96 input).

Prints, per level and backend: eval-forward and training forward+backward medians, the byte
floor, achieved GB/s against it and the ratio to a measured device-to-device copy.
"""
import json
import os
import sys

import torch
import triton.testing as tt

from attention_gates import GridAttentionGate3D

LEVELS = {"l2": (32, 64, (80, 80, 48)), "l3": (64, 128, (40, 40, 24)), "l4": (128, 256, (20, 20, 12))}


def main(out_path):
    dev = torch.device("cuda")
    buf = torch.empty(2**28, device=dev)  # 1 GiB
    t = tt.do_bench(lambda: buf.clone(), return_mode="median")
    copy_gbs = 2 * buf.numel() * 4 / t / 1e6
    rows = [{"what": "copy", "GB/s": copy_gbs}]
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s ({torch.cuda.get_device_name()})", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        for name, (C, CG, S) in LEVELS.items():
            Sg = tuple(s // 2 for s in S)
            x = torch.randn(2, C, *S, device=dev, dtype=dtype, requires_grad=True)
            g = torch.randn(2, CG, *Sg, device=dev, dtype=dtype, requires_grad=True)
            el = x.element_size()
            fwd_floor = (x.numel() + g.numel() + x.numel()) * el + x.numel() // C * el
            bwd_floor = fwd_floor + (x.numel() + x.numel() + g.numel()) * el  # + read dout, write dx, dg
            res = {}
            for backend in ("reference", "compile", "triton"):
                gate = GridAttentionGate3D(C, CG, C, backend=backend).to(dev)
                try:
                    gate.eval()
                    with torch.no_grad():
                        ms_f = tt.do_bench(lambda: gate(x, g), return_mode="median")
                        # the same, replayed as a CUDA graph: GPU time without Python/launch overhead
                        ms_fg = tt.do_bench_cudagraph(lambda: gate(x, g), return_mode="median")
                    gate.train()
                    do = torch.randn_like(x)

                    def step():
                        out, _ = gate(x, g)
                        out.backward(do)

                    ms_b = tt.do_bench(step, return_mode="median", grad_to_none=[x, g])
                except Exception as e:  # report, keep going
                    print(f"{name} {backend} {dtype}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                res[backend] = (ms_f, ms_b)
                row = dict(level=name, dtype=str(dtype), backend=backend, eval_ms=ms_f, eval_graph_ms=ms_fg, train_ms=ms_b,
                           eval_floor_GBs=fwd_floor / ms_f / 1e6, train_floor_GBs=bwd_floor / ms_b / 1e6)
                row["eval_pct_copy"] = 100 * row["eval_floor_GBs"] / copy_gbs
                row["eval_graph_pct_copy"] = 100 * fwd_floor / ms_fg / 1e6 / copy_gbs
                rows.append(row)
                print(json.dumps(row), flush=True)
                with open(out_path, "w") as f:  # after every row: a stage cut by its timeout keeps what it measured
                    json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "triton": __import__("triton").__version__, "rows": rows}, f, indent=1)
    print(f"{'level':5} {'dtype':15} {'backend':9} {'eval ms':>8} {'graph ms':>8} {'graph %copy':>11} {'train ms':>9} {'train GB/s':>10}")
    for r in rows[1:]:
        print(f"{r['level']:5} {r['dtype']:15} {r['backend']:9} {r['eval_ms']:8.3f} {r['eval_graph_ms']:8.3f} "
              f"{r['eval_graph_pct_copy']:11.1f} {r['train_ms']:9.3f} {r['train_floor_GBs']:10.0f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("OUT", "."), "gate_quick.json"))

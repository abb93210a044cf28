"""Quick GPU model overhead: AttentionUNet3D (per gate backend) vs UNet3D vs MONAI AttentionUnet,
training step (forward + backward) median time and max_memory_allocated, fp32 and bf16 autocast,
batch 2 at the paper's 160x160x96 patch."""
import json
import sys

import torch
import triton.testing as tt

from attention_gates import AttentionUNet3D, UNet3D


def models():
    yield "UNet3D", lambda: UNet3D(1, 2)
    for b in ("reference", "triton"):
        yield f"AttentionUNet3D[{b}]", lambda b=b: AttentionUNet3D(1, 2, backend=b)
    try:
        from monai.networks.nets import AttentionUnet

        yield "MONAI AttentionUnet", lambda: AttentionUnet(3, 1, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))
    except Exception as e:  # noqa: BLE001
        print("MONAI skipped:", e)


def main(out):
    dev = torch.device("cuda")
    x = torch.randn(2, 1, 160, 160, 96, device=dev)
    rows = []
    for amp in (False, True):
        for name, make in models():
            net = make().to(dev).train()
            opt = torch.optim.Adam(net.parameters(), 1e-4)

            def step():
                with torch.autocast("cuda", torch.bfloat16, enabled=amp):
                    y = net(x)
                y.float().mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            try:
                step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                ms = tt.do_bench(step, warmup=50, rep=300, return_mode="median")
                mem = torch.cuda.max_memory_allocated() / 2**30
            except Exception as e:  # noqa: BLE001
                print(name, amp, "FAILED", type(e).__name__, str(e)[:300], flush=True)
                continue
            row = dict(model=name, amp_bf16=amp, step_ms=ms, max_mem_GiB=mem, params=sum(p.numel() for p in net.parameters()))
            rows.append(row)
            print(json.dumps(row), flush=True)
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, open(out, "w"), indent=1)
            del net, opt
            torch.cuda.empty_cache()
    base = {r["amp_bf16"]: r for r in rows if r["model"] == "UNet3D"}
    print(f"{'model':26} {'amp':5} {'step ms':>8} {'mem GiB':>8} {'t/UNet':>7} {'m/UNet':>7}")
    for r in rows:
        b = base.get(r["amp_bf16"])
        print(f"{r['model']:26} {str(r['amp_bf16']):5} {r['step_ms']:8.1f} {r['max_mem_GiB']:8.2f} "
              f"{r['step_ms'] / b['step_ms'] if b else float('nan'):7.3f} {r['max_mem_GiB'] / b['max_mem_GiB'] if b else float('nan'):7.3f}")


if __name__ == "__main__":
    main(sys.argv[1])

"""Ladder side networks on a RoBERTa-large-sized encoder (24 layers, d = 1024, 16 heads; random
weights from the config), bf16, AdamW, batch 16 x 128: one whole training step of full fine-tuning,
PEFT LoRA (query + value, r = 8, as the anchor /work/shared/anchors/peft_roberta_step.py), spu LST and
spu k-LST (k = 3, 5, 9), side by side in one run: peak memory and samples/s. Then the fused
cross-attention kernel alone: time and the share of HBM bandwidth on the bytes it must move.
Needs a CUDA GPU; without one it says so and exits with status 0.

    python benchmarks/bench_ladder_step.py [--out DIR] [--methods full,peft_lora,lst,klst3,klst5,klst9]
"""
import argparse
import json
import os
import sys

import torch

B, S = 16, 128
TARGETS = {"klst3": dict(peak_vs_full=0.22, samples_vs_full=2.0)}


def make(method):
    from transformers import RobertaConfig, RobertaForSequenceClassification
    torch.manual_seed(0)
    m = RobertaForSequenceClassification(RobertaConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, vocab_size=50265,
        max_position_embeddings=514, num_labels=2)).to("cuda", torch.bfloat16)
    if method == "peft_lora":
        from peft import LoraConfig, get_peft_model
        m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                         modules_to_save=["classifier"]))
    elif method == "lst":
        import spu_kernels
        spu_kernels.patch(m, "lst", r=8)
    elif method.startswith("klst"):
        import spu_kernels
        spu_kernels.patch(m, "klst", k=int(method[4:]), r=8)
    elif method != "full":
        raise ValueError(method)
    return m


def measure_step(method, batch):
    from triton.testing import do_bench
    m = make(method)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        loss = m(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20
    ms = do_bench(step, warmup=20, rep=300, return_mode="median")
    row = dict(method=method, ms=ms, samples_s=B / ms * 1000, peak_mib=peak,
               trainable=sum(p.numel() for p in params))
    del m, opt, params
    torch.cuda.empty_cache()
    return row


def kernel_rows(peak_gbps):
    """The op alone, triton backend, d_s = 128, 16 heads: forward and forward+backward."""
    from triton.testing import do_bench
    from spu_kernels.ops.ladder_cross_attention import ladder_cross_attention
    rows = []
    h, dh, es = 16, 8, 2
    d = h * dh
    for T in (B * S, 65536):
        for k in (3, 5, 9):
            q = torch.randn(T, h, dh, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            c = torch.randn(k, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            wk = (torch.randn(d, d, device="cuda", dtype=torch.bfloat16) / d ** 0.5).requires_grad_()
            wv = (torch.randn(d, d, device="cuda", dtype=torch.bfloat16) / d ** 0.5).requires_grad_()
            do = torch.randn_like(q)
            fwd = lambda: ladder_cross_attention(q, c, wk, wv, backend="triton")
            out = fwd()

            def fwd_bwd():
                torch.autograd.grad(fwd(), (q, c, wk, wv), do)
            ms_f = do_bench(fwd, warmup=20, rep=200, return_mode="median")
            ms_fb = do_bench(fwd_bwd, warmup=20, rep=200, return_mode="median")
            # the bytes each must move at least: forward reads q, C, W_k, W_v and writes o (+ T·h fp32 lse);
            # backward reads q, C, o, dO, W_k, W_v, lse and writes dq, dC, dW_k, dW_v (fp32)
            fwd_bytes = (2 + k) * T * d * es + 2 * d * d * es + T * h * 4
            bwd_bytes = (4 + 2 * k) * T * d * es + 2 * d * d * es + 2 * d * d * 4 + T * h * 4
            rows.append(dict(T=T, k=k, fwd_ms=ms_f, fwd_bwd_ms=ms_fb,
                             fwd_hbm=fwd_bytes / (ms_f * 1e-3) / (peak_gbps * 1e9),
                             fwd_bwd_hbm=(fwd_bytes + bwd_bytes) / (ms_fb * 1e-3) / (peak_gbps * 1e9)))
            del q, c, wk, wv, do, out
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "results")))
    ap.add_argument("--methods", default="full,peft_lora,lst,klst3,klst5,klst9")
    ap.add_argument("--peak-gbps", type=float, default=3350.0, help="HBM peak of the GPU (H100 SXM: 3350)")
    ap.add_argument("--no-kernel", action="store_true", help="skip the kernel-alone table")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_ladder_step.py: no CUDA GPU here; nothing measured (numbers pending a GPU run)")
        return 0
    import spu_kernels
    ids = torch.randint(0, 50265, (B, S), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.randint(0, 2, (B,), device="cuda")}
    rows = []
    for method in [m for m in args.methods.split(",") if m]:
        try:
            rows.append(measure_step(method, batch))
        except ImportError as e:          # e.g. peft not installed
            print(f"{method}: skipped ({e})")
    full = next((r for r in rows if r["method"] == "full"), None)
    print(f"## whole training step, RoBERTa-large-sized, bf16, batch {B} x {S}\n")
    print("| method | ms/step | samples/s | vs full | peak MiB | vs full | trainable | target |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        vs_s = f"{r['samples_s'] / full['samples_s']:.2f}x" if full else "-"
        vs_m = f"{r['peak_mib'] / full['peak_mib']:.2f}x" if full else "-"
        t = TARGETS.get(r["method"])
        tgt = f"peak <= {t['peak_vs_full']}x, samples/s >= {t['samples_vs_full']}x" if t else ""
        print(f"| {r['method']} | {r['ms']:.2f} | {r['samples_s']:.1f} | {vs_s} | {r['peak_mib']:.0f} | {vs_m} | "
              f"{r['trainable'] / 1e6:.2f}M | {tgt} |")
    krows = [] if args.no_kernel else kernel_rows(args.peak_gbps)
    if krows:
        print(f"\n## fused ladder cross-attention alone (triton, bf16, d_s = 128, 16 heads), "
              f"share of {args.peak_gbps:.0f} GB/s (target >= 70%)\n")
        print("| T | k | fwd ms | fwd HBM | fwd+bwd ms | fwd+bwd HBM |")
        print("|---|---|---|---|---|---|")
        for r in krows:
            print(f"| {r['T']} | {r['k']} | {r['fwd_ms']:.3f} | {100 * r['fwd_hbm']:.0f}% | {r['fwd_bwd_ms']:.3f} | "
                  f"{100 * r['fwd_bwd_hbm']:.0f}% |")
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__,
               spu_kernels=spu_kernels.__version__)
    try:
        env["peft"] = __import__("peft").__version__
    except ImportError:
        pass
    print("env:", env)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_ladder_step.json"), "w") as f:
        json.dump(dict(env=env, step=rows, kernel=krows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MeZO step vs inference: peak memory of one MeZO step against one no-grad forward of the same
batch (target ≤ 1.1×), and its time against two forward passes. RoBERTa-large-sized model (random
weights), bf16, batch 16 × 128; full-parameter MeZO and MeZO on LoRA (r = 8) adapters. Needs a GPU.

    python benchmarks/bench_mezo.py [--out DIR] [--layers 24 --hidden 1024]
"""
import argparse
import json
import os
import sys

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "results")))
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_mezo.py needs a CUDA GPU")
    import transformers as tf
    from triton.testing import do_bench

    import spu_kernels
    from spu_kernels.optim import MeZO

    cfg = tf.RobertaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                           intermediate_size=4 * args.hidden, max_position_embeddings=args.seq + 2, num_labels=2)
    batch = dict(input_ids=torch.randint(3, cfg.vocab_size, (args.batch, args.seq), device="cuda"),
                 labels=torch.randint(0, 2, (args.batch,), device="cuda"))
    def measure(trainable):
        torch.manual_seed(0)
        model = tf.RobertaForSequenceClassification(cfg).to("cuda", torch.bfloat16)
        if trainable == "lora":
            spu_kernels.patch(model, "lora", r=8, adapter_dtype="bfloat16")
        opt = MeZO([p for p in model.parameters() if p.requires_grad], lr=1e-6, eps=1e-3)

        def forward():
            with torch.no_grad():
                return model(**batch).loss

        def step():
            return opt.step(forward)

        def peak(fn):
            fn()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20

        infer_mb, step_mb = peak(forward), peak(step)
        fwd_ms = do_bench(forward, warmup=10, rep=100, return_mode="median")
        step_ms = do_bench(step, warmup=10, rep=100, return_mode="median")
        return dict(trainable=trainable, infer_peak_mib=infer_mb, step_peak_mib=step_mb, mem_ratio=step_mb / infer_mb,
                    forward_ms=fwd_ms, step_ms=step_ms, step_over_two_forwards=step_ms / (2 * fwd_ms))

    rows = []
    for trainable in ("full", "lora"):
        rows.append(measure(trainable))
        torch.cuda.empty_cache()
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__,
               spu_kernels=spu_kernels.__version__, layers=args.layers, hidden=args.hidden, batch=args.batch,
               seq=args.seq)
    print("| trainable | inference peak MiB | MeZO step peak MiB | ratio (≤ 1.1) | 2 forwards ms | step ms | step / 2 fwd |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['trainable']} | {r['infer_peak_mib']:.0f} | {r['step_peak_mib']:.0f} | {r['mem_ratio']:.3f} | "
              f"{2 * r['forward_ms']:.2f} | {r['step_ms']:.2f} | {r['step_over_two_forwards']:.3f} |")
    print("env:", env)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_mezo.json"), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

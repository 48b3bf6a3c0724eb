"""The low-rank op's table: forward+backward time of a r=16 LoRA layer relative to the frozen base
nn.Linear (bf16), for spu_kernels' backends and PEFT LoRA, dropout 0 and 0.1, plus the peak memory
each adds over the base. Needs a CUDA GPU. Prints a markdown table and writes JSON.

    python benchmarks/bench_lowrank.py [--out DIR] [--kinds base,spu_triton,peft_lora]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _layers import SHAPES, TARGETS, build, step_fn, time_and_peak  # noqa: E402


def measure(kind, T, k, n, p):
    result = time_and_peak(step_fn(build(kind, k, n, p), T, k, n))
    torch.cuda.empty_cache()
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "results")))
    ap.add_argument("--kinds", default="base,spu_triton,spu_torch,peft_lora")
    ap.add_argument("--dropouts", default="0,0.1")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_lowrank.py needs a CUDA GPU")
    import spu_kernels
    kinds = [k for k in args.kinds.split(",") if k]
    if "spu_cuda" not in kinds and "cuda" in spu_kernels.available_backends():
        kinds.append("spu_cuda")
    rows = []
    for (T, k, n) in SHAPES:
        for p in [float(v) for v in args.dropouts.split(",")]:
            res = {kind: measure(kind, T, k, n, p) for kind in kinds}
            for kind, (ms, mb) in res.items():
                rows.append(dict(T=T, K=k, N=n, dropout=p, kind=kind, ms=ms, peak_extra_mib=mb,
                                 ratio_vs_base=ms / res["base"][0], target=TARGETS[(T, k, n)]))
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__, spu_kernels=spu_kernels.__version__)
    try:
        env["peft"] = __import__("peft").__version__
    except ImportError:
        pass
    print(f"| (T, K, N) | dropout | {' | '.join(kinds)} | target |")
    print("|---|---|" + "---|" * (len(kinds) + 1))
    for (T, k, n) in SHAPES:
        for p in sorted({r["dropout"] for r in rows}):
            sel = {r["kind"]: r for r in rows if (r["T"], r["K"], r["N"], r["dropout"]) == (T, k, n, p)}
            cells = [f"{sel[kd]['ratio_vs_base']:.2f}x ({sel[kd]['ms']:.3f} ms, +{sel[kd]['peak_extra_mib']:.0f} MiB)"
                     for kd in kinds]
            print(f"| {T}, {k}, {n} | {p:g} | {' | '.join(cells)} | <= {TARGETS[(T, k, n)]:.2f} |")
    print("env:", env)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_lowrank.json"), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

"""The (IA)³ / KronA table: forward+backward time relative to the frozen base nn.Linear (bf16) for
spu_kernels' backends, PEFT IA3 and PEFT LoKr (r=16), plus the peak memory each adds over the base.
Needs a CUDA GPU (exits with a message otherwise). Prints a markdown table and writes JSON.

    python benchmarks/bench_ia3_krona.py [--out DIR] [--groups ia3,ia3_input,krona]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _layers import time_and_peak  # noqa: E402
from _layers_ia3_krona import GROUPS, SHAPES, TARGETS, build, step_fn  # noqa: E402


def measure(kind, T, k, n):
    result = time_and_peak(step_fn(build(kind, k, n), T, k, n))
    torch.cuda.empty_cache()
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "results")))
    ap.add_argument("--groups", default=",".join(GROUPS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_ia3_krona.py needs a CUDA GPU")
    import spu_kernels
    groups = [g for g in args.groups.split(",") if g]
    rows = []
    for group in groups:
        for (T, k, n) in SHAPES:
            res = {}
            for kind in GROUPS[group]:
                try:
                    res[kind] = measure(kind, T, k, n)
                except Exception as e:   # e.g. a PEFT version without this adapter: report, go on
                    print(f"{group} {kind} {T}x{k}x{n} failed: {e!r}"[:300])
                    res[kind] = (float("nan"), float("nan"))
            for kind, (ms, mb) in res.items():
                rows.append(dict(group=group, T=T, K=k, N=n, kind=kind, ms=ms, peak_extra_mib=mb,
                                 ratio_vs_base=ms / res["base"][0], target=TARGETS[group]))
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__, spu_kernels=spu_kernels.__version__)
    try:
        env["peft"] = __import__("peft").__version__
    except ImportError:
        pass
    for group in groups:
        kinds = GROUPS[group]
        print(f"\n{group}\n| (T, K, N) | {' | '.join(kinds)} | target |")
        print("|---|" + "---|" * (len(kinds) + 1))
        for (T, k, n) in SHAPES:
            sel = {r["kind"]: r for r in rows if (r["group"], r["T"], r["K"], r["N"]) == (group, T, k, n)}
            cells = [f"{sel[kd]['ratio_vs_base']:.2f}x ({sel[kd]['ms']:.3f} ms, +{sel[kd]['peak_extra_mib']:.0f} MiB)"
                     for kd in kinds]
            print(f"| {T}, {k}, {n} | {' | '.join(cells)} | <= {TARGETS[group]:.2f} |")
    print("env:", env)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_ia3_krona.json"), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

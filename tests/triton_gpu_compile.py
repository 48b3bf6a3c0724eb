"""Compile every Triton kernel of spu_kernels for a GPU architecture, without a GPU.

The Triton interpreter (what CI runs the kernels with) checks their numerics but not that they
compile for a real GPU, where tile shapes, dtypes and autotune configs differ. This script drives
each op's triton backend, forward and backward, on CPU tensors with Triton's GPU code path: a
stand-in driver (spu_kernels/triton/stub_driver.py) reports the target architecture, every launch
is turned into a compile-only warm-up (nothing runs; outputs are garbage and unused), and autotuned
kernels compile every config.
Compilation (Triton → PTX → cubin through ptxas) needs no GPU.

    python tests/triton_gpu_compile.py [--arch 90] [--dtypes bf16,fp16,fp32]

Prints one line per op and exits non-zero on the first kernel that does not compile. Then, from
each compiled cubin (cuobjdump -res-usage, Triton's bundled binary), a line per kernel: variants,
most registers, most shared memory and most local-memory stack per thread (spills), and a FAIL line
for a kernel whose stack passes its entry in SPILL_BUDGET (spills may only shrink), for a variant
that asks for more shared memory than an sm_90 block may have (227 KB), and, on sm_90, for a
variant of the GEMM core (triton/gemm.py) whose operands qualify for TMA but whose PTX has no TMA
bulk-tensor load (``cp.async.bulk.tensor``) or, for 16-bit operands, no ``wgmma``.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)     # the GPU code path, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402

from spu_kernels.triton.stub_driver import COMPILED, compile_only  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Local-memory stack (bytes per thread; registers spilled) each kernel may use at most, over all its
# variants, per operand width: what sm_90 / Triton 3.8.0 gave on 2026-11-24. A kernel absent here
# must not spill; spills may only shrink. fp32 operands run on FMA (ieee dots, no tensor cores).
SPILL_BUDGET = {
    "16-bit": {
        "_gemm_kernel": 88,         # the dx GEMM with dropout and grad_A, 64×128 (bf16 16-48 B, fp16 88 B)
        "_bwd_kernel": 912,         # the ladder's backward
        "_dw_kernel": 968,
        "_fwd_kernel": 40,
        "_zo_axpby_kernel": 32,
        "_scaled_act_bwd_kernel": 8,
    },
    "fp32": {
        "_gemm_kernel": 232,        # the rank-r and grad_A epilogues beside a 64×128 FMA accumulator
                                    # (lowrank dropout, the cuBLAS way's rank-r GEMM: 232 B; grad_A: 168 B)
        "_bottleneck_bwd_kernel": 136,   # r = 128: g (BLOCK_M × 128) and its act' beside the dh tile
        "_bottleneck_fwd_kernel": 8,
        "_bwd_kernel": 912,
        "_dw_kernel": 968,
        "_fwd_kernel": 40,
        "_grad_a_kernel": 8,
        "_zo_axpby_kernel": 32,
        "_scaled_act_bwd_kernel": 8,
    },
}
_RES = re.compile(r"REG:(\d+) STACK:(\d+)")
MAX_SHARED = 232448                 # bytes of shared memory one block may have on sm_90 (227 KB)


def gemm_core_report(compiled, arch: int) -> list[str]:
    """Per compiled variant of the GEMM core: whether it uses TMA and wgmma where it should."""
    lines, seen = [], set()
    for name, _, kernel in compiled:
        if name != "_gemm_kernel" or arch < 90 or id(kernel) in seen:
            continue
        seen.add(id(kernel))
        names = kernel.src.fn.arg_names
        const = {names[k[0]] if isinstance(k, tuple) else k: v for k, v in kernel.src.constants.items()}
        ptx = kernel.asm["ptx"]
        tag = (f"{const['BLOCK_M']}x{const['BLOCK_N']}x{const['BLOCK_K']} "
               f"{kernel.src.signature.get('a_ptr', '')}")
        if const.get("A_TMA") and "cp.async.bulk.tensor" not in ptx:
            lines.append(f"FAIL _gemm_kernel {tag}: A qualifies for TMA but the PTX has no cp.async.bulk.tensor")
        if const.get("A_TMA") and const.get("UPCAST") is False and "16" in tag and "wgmma.mma_async" not in ptx:
            lines.append(f"FAIL _gemm_kernel {tag}: 16-bit operands but no wgmma in the PTX")
    tma = sum(1 for n, _, k in compiled if n == "_gemm_kernel" and "cp.async.bulk.tensor" in k.asm["ptx"])
    lines.append(f"gemm {tma} TMA variants of _gemm_kernel")
    return lines


def resource_report(compiled, dname: str) -> list[str]:
    """Per kernel name: variants, max registers / shared bytes / stack bytes of the kernels compiled
    for operands of dtype ``dname``; FAIL lines past SPILL_BUDGET and MAX_SHARED."""
    budget = SPILL_BUDGET["fp32" if dname == "fp32" else "16-bit"]
    import triton as _triton
    tool = os.path.join(os.path.dirname(_triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage: dict[str, list[tuple[int, int, int]]] = {}
    seen = set()
    with tempfile.TemporaryDirectory() as tmp:
        for name, _, kernel in compiled:
            cubin = getattr(kernel, "asm", {}).get("cubin")
            if cubin is None or hash(cubin) in seen:
                continue
            seen.add(hash(cubin))
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
            text = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
            # the kernel's own line follows "Function <name>:" (device functions have their own)
            m = re.search(rf"Function {re.escape(kernel.name)}:\s*\n\s*{_RES.pattern}", text)
            if m:   # shared memory: Triton's dynamic allocation, from the kernel's metadata
                usage.setdefault(name, []).append((int(m.group(1)), int(m.group(2)), kernel.metadata.shared))
    lines = []
    for name, rows in sorted(usage.items()):
        regs, stack, shared = max(r[0] for r in rows), max(r[1] for r in rows), max(r[2] for r in rows)
        spilling = sum(r[1] > 0 for r in rows)
        lines.append(f"res  {dname} {name}: {len(rows)} variants, <= {regs} registers, <= {shared} B shared, "
                     f"stack <= {stack} B ({spilling} spilling)")
        if shared > MAX_SHARED:
            lines.append(f"FAIL {name} asks for {shared} B of shared memory, past the {MAX_SHARED} B of an sm_90 block")
        if stack > budget.get(name, 0):
            lines.append(f"FAIL {dname} {name} spills {stack} B per thread, over its budget of {budget.get(name, 0)} B "
                         "(SPILL_BUDGET in tests/triton_gpu_compile.py)")
    return lines


def _grads(y, *leaves):
    torch.autograd.grad(y.float().sum(), [t for t in leaves if t.requires_grad], allow_unused=True)


def ops(dt):
    """(name, fn) pairs driving every kernel: forward and backward of each op."""
    import spu_kernels.ops as O
    r = lambda *s, grad=False: torch.randn(*s, dtype=dt).requires_grad_(grad)    # noqa: E731

    def lowrank(p, x_grad=True):
        def f():     # with x frozen, grad_A has its own kernel (else the dx GEMM's epilogue makes it)
            x, a, b, g = r(70, 96, grad=x_grad), r(8, 96, grad=True), r(80, 8, grad=True), r(8, grad=True)
            _grads(O.lowrank_linear(x, r(80, 96), r(80), a, b, rank_scale=g, dropout_p=p, seed=3, backend="triton"),
                   x, a, b, g)
        return f

    def ia3(side):
        def f():
            x, l = r(70, 96, grad=True), r(80 if side == "output" else 96, grad=True)
            _grads(O.ia3_linear(x, r(80, 96), r(80, grad=True), l, side=side, backend="triton"), x, l)
        return f

    def act(name):
        def f():
            h, l = r(70, 96, grad=True), r(96, grad=True)
            _grads(O.ia3_scaled_act(h, l, name, backend="triton"), h, l)
        return f

    def ia3_dynamic():
        x, b, d, u = r(70, 96, grad=True), r(80, grad=True), r(4, 96, grad=True), r(80, 4, grad=True)
        _grads(O.ia3_dynamic_linear(x, r(80, 96), b, d, u, backend="triton"), x, b, d, u)

    def bottleneck(act_name, rank):
        def f():
            h, wd, bd = r(70, 96, grad=True), r(rank, 96, grad=True), r(rank, grad=True)
            wu, bu = r(96, rank, grad=True), r(96, grad=True)
            _grads(O.bottleneck_adapter(h, wd, bd, wu, bu, act_name, backend="triton"), h, wd, bd, wu, bu)
        return f

    def kron():
        x, a, b = r(70, 96, grad=True), r(8, 12, grad=True), r(10, 8, grad=True)
        _grads(O.kron_linear(x, r(80, 96), None, a, b, scale=0.5, backend="triton"), x, a, b)

    def ladder(k, dh):
        def f():
            h = 4
            q, c = r(70, h, dh, grad=True), r(k, 70, h * dh, grad=True)
            wk, wv = r(h * dh, h * dh, grad=True), r(h * dh, h * dh, grad=True)
            _grads(O.ladder_cross_attention(q, c, wk, wv, backend="triton"), q, c, wk, wv)
        return f

    def zo():
        O.zo_axpby_([torch.zeros(5000, dtype=dt), torch.zeros(33, dtype=dt)], 7, 1.0, 0.1, backend="triton")

    yield "lowrank_linear", lowrank(0.0)
    yield "lowrank_linear dropout", lowrank(0.1)
    yield "lowrank_linear dropout, x frozen", lowrank(0.1, x_grad=False)

    def strided():   # x (70, 96) with unit stride along tokens: the GEMM core's pointer path for A
        x = torch.randn(96, 70, dtype=dt).t().requires_grad_(True)
        a, b = r(8, 96, grad=True), r(80, 8, grad=True)
        _grads(O.lowrank_linear(x, r(80, 96), None, a, b, backend="triton"), x, a, b)
    yield "lowrank_linear, x strided", strided

    def cublas_way():   # the K = 0 pass of the GEMM core that cuBLAS adds the dense product into
        os.environ["SPU_KERNELS_GEMM"] = "cublas"
        try:
            lowrank(0.1)()
        finally:
            del os.environ["SPU_KERNELS_GEMM"]
    yield "lowrank_linear dropout, cuBLAS way", cublas_way
    yield "ia3_linear output", ia3("output")
    yield "ia3_linear input", ia3("input")
    for name in O.ia3.ACTIVATIONS:
        yield f"ia3_scaled_act {name}", act(name)
    yield "ia3_dynamic_linear", ia3_dynamic
    yield "bottleneck_adapter gelu r=24", bottleneck("gelu", 24)
    yield "bottleneck_adapter relu r=128", bottleneck("relu", 128)
    yield "kron_linear", kron
    yield "ladder_cross_attention k=3 d_h=32", ladder(3, 32)
    yield "ladder_cross_attention k=5 d_h=24", ladder(5, 24)
    yield "zo_axpby_", zo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90, help="compute capability as an int, e.g. 80, 90")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    args = ap.parse_args(argv)
    compile_only(args.arch)
    total = time.time()
    first = {}          # dtype name -> index of its first compile in COMPILED
    for dname in args.dtypes.split(","):
        first[dname] = len(COMPILED)
        for name, fn in ops(DTYPES[dname]):
            n0, t = len(COMPILED), time.time()
            try:
                fn()
            except Exception as e:
                print(f"FAIL sm_{args.arch} {dname} {name}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                return 1
            print(f"ok   sm_{args.arch} {dname} {name}: {len(COMPILED) - n0} kernel compiles in "
                  f"{time.time() - t:.1f} s",
                  flush=True)
    print(f"compiled {len(COMPILED)} kernels for sm_{args.arch} ({triton.__version__}) in {time.time() - total:.0f} s")
    ends = list(first.values())[1:] + [len(COMPILED)]
    report = [line for (dname, start), end in zip(first.items(), ends)
              for line in resource_report(COMPILED[start:end], dname)] + gemm_core_report(COMPILED, args.arch)
    print("\n".join(report))
    return 1 if any(line.startswith("FAIL") for line in report) else 0


if __name__ == "__main__":
    sys.exit(main())

"""``host``: what the host (CPU) spends on one forward+backward of one adapted layer, per op and
backend, beside ``nn.Linear`` and the matching PEFT layer on the same tiny tensors (T = 8,
K = N = 64, r = 16, bf16). On a GPU the seeds' models are launch-bound (a 1024×1024 GEMM over 2,048
tokens takes ~6 µs on an H100), so this is their step time's floor.

Runs without a GPU, in a process of its own (ISOLATED): Triton's real compiler builds the kernels
for sm_90 once, then every launch runs the package's whole host path (spu_kernels/triton/_launcher.py:
cached launches, replayed plans; Triton's own path on a miss) and stops at the stand-in driver's
counting no-op launcher (spu_kernels/triton/stub_driver.py), which also gives the launches per
call. The torch kinds run their (tiny) CPU math for real. Targets (issue #13): spu triton ≤ 2× the
frozen nn.Linear's host time and ≤ 0.6× PEFT's for the same method.
"""
from __future__ import annotations

from benchmarks.measure import Case, Variant
from benchmarks.suites.layers import GROUPS, backend_or_skip, build_layer, implemented, ladder_call, layer_step

ISOLATED = True
T, K, N, RANK = 8, 64, 64, 16
LADDER_T, LADDER_K, LADDER_HEADS, LADDER_D = 8, 3, 4, 64
BASE_TARGET = 2.0        # spu triton host time over nn.Linear's
_stub = None


def _stub_driver():
    global _stub
    if _stub is None:
        from spu_kernels.triton.stub_driver import install_stub_launches
        _stub = install_stub_launches(90)
    return _stub


def _launches(kind: str, fn) -> dict[str, float]:
    if not kind.endswith("_triton"):
        return {}
    stub = _stub_driver()
    before = stub.launches
    fn()
    return {"launches": float(stub.launches - before)}


def _layer(kind: str, dropout: float, op_module: str | None):
    def setup():
        if op_module is not None:
            backend_or_skip(op_module, kind.rsplit("_", 1)[1], "cpu")
        return layer_step(build_layer(kind, K, N, rank=RANK, dropout=dropout, device="cpu"), T, K, N, device="cpu")
    return Variant(kind, setup)


def cases(smoke: bool, device: str) -> list[Case]:
    import torch
    torch.set_num_threads(1)      # host cost, not intra-op parallelism (which collapses on a loaded 2-core box)
    _stub_driver()
    out = []
    common = dict(suite="host", dtype="bf16", host_timing=True, warmup_ms=200, rep_ms=1000, probe=_launches)
    for group, (op_module, peft_kind, methods) in GROUPS.items():
        for p in ((0.0, 0.1) if group == "lowrank" else (0.0,)):
            if smoke and (group != "lowrank" or p):
                continue
            kinds = ["base", peft_kind] + [f"spu_{m}_{b}" for m in methods for b in ("torch", "triton")
                                           if b in implemented(op_module) and not (smoke and m != "lora")]
            suffix = f"/p{p:g}" if group == "lowrank" else ""
            out.append(Case(name=f"{group}{suffix}",
                            config=f"T={T} K={K} N={N}" + (f" r={RANK}" if group in ("lowrank", "krona") else "")
                            + (f" dropout={p:g}" if group == "lowrank" else ""),
                            variants=[_layer(k, p, op_module if k.startswith("spu_") else None) for k in kinds],
                            reference="base", target=BASE_TARGET, target_kinds=("spu_",), **common))
    if not smoke:
        out.append(Case(name="ladder",
                        config=f"T={LADDER_T} k={LADDER_K} d={LADDER_D} heads={LADDER_HEADS}",
                        variants=[Variant(f"spu_ladder_{b}", lambda b=b: ladder_call(
                            LADDER_T, LADDER_K, b, heads=LADDER_HEADS, d=LADDER_D, device="cpu"))
                                  for b in ("torch", "triton")],
                        reference="spu_ladder_torch", **common))
    return out

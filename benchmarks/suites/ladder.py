"""``ladder``: the fused ladder cross-attention alone (triton; d_s = 128, 16 heads, as RoBERTa-large's
k-LST side network), forward and forward+backward, at the seeds' token count (16 × 128 = 2048) and
a large one (65536), k = 3, 5, 9: time, and the achieved bandwidth on the bytes the op must move at
least, as a share of the GPU's HBM bandwidth (target ≥ 70 %, meaningful at the large T only: at
2048 tokens the kernel moves ~1.5 MB and launch latency dominates). The torch reference (which
materialises the projected keys and values) is the ratio's reference."""
from __future__ import annotations

from benchmarks.measure import Case, Variant
from benchmarks.suites.layers import LADDER_D, LADDER_HEADS, ladder_call

# HBM bandwidth by GPU name (datasheet, GB/s); a GPU not listed gets no hbm_share row
PEAK_GBPS = {"H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H200": 4800.0, "A100-SXM4-80GB": 2039.0,
             "A100-SXM4-40GB": 1555.0}
HBM_TARGET = 0.70
ELEMENT_BYTES = 2


def min_bytes(T: int, k: int, d: int, heads: int, backward: bool) -> int:
    """Forward reads q, C, W_k, W_v and writes o and a T·h fp32 log-sum-exp; backward reads q, C, o,
    dO, W_k, W_v and the lse and writes dq, dC and fp32 dW_k, dW_v."""
    es = ELEMENT_BYTES
    fwd = (2 + k) * T * d * es + 2 * d * d * es + T * heads * 4
    bwd = (4 + 2 * k) * T * d * es + 2 * d * d * es + 2 * d * d * 4 + T * heads * 4
    return fwd + (bwd if backward else 0)


def peak_gbps(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def cases(smoke: bool, device: str) -> list[Case]:
    heads, d = (4, 32) if smoke else (LADDER_HEADS, LADDER_D)
    backends = ("torch",) if smoke and device == "cpu" else ("torch", "triton")
    out = []
    for T in ((64,) if smoke else (2048, 65536)):
        for k in ((3,) if smoke else (3, 5, 9)):
            for backward in (False, True):
                which = "fwd_bwd" if backward else "fwd"
                out.append(Case(
                    suite="ladder", name=f"T{T}_k{k}/{which}",
                    config=f"T={T} k={k} d={d} heads={heads} {which.replace('_', '+')}", dtype="bf16",
                    variants=[Variant(f"spu_ladder_{b}", lambda T=T, k=k, b=b, bw=backward:
                                      ladder_call(T, k, b, heads=heads, d=d, device=device, backward=bw))
                              for b in backends],
                    reference="spu_ladder_torch", bytes_per_call=min_bytes(T, k, d, heads, backward),
                    peak_gbps=peak_gbps(device), target=HBM_TARGET if T >= 65536 else None,
                    target_kinds=("spu_ladder_triton",), target_metric="hbm_share"))
    return out

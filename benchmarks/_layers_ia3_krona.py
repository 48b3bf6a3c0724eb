"""The layers the (IA)³ and KronA benchmarks compare, at benchmarks/_layers.py's SHAPES, bf16:
the frozen base nn.Linear, PEFT IA3 / LoKr (configured as /work/shared/anchors/peft_layer_overhead.py),
and spu_kernels' IA3Linear / KronALinear per backend. Adapters are perturbed from their init so
no kernel sees an all-ones scale or an all-zero factor."""
import torch
import torch.nn as nn

from _layers import SHAPES, Proj, step_fn  # noqa: F401  (re-exported for the suite and the table)

LOKR_RANK = 16
# issue #4's targets on an H100: fwd+bwd time relative to the frozen base layer
TARGETS = {"ia3": 1.05, "ia3_input": 1.05, "krona": 1.15}
# what each adapter is compared with: {group: [kinds]}
GROUPS = {
    "ia3": ["base", "spu_ia3_triton", "spu_ia3_torch", "peft_ia3"],                # k/v: output scale
    "ia3_input": ["base", "spu_ia3in_triton", "spu_ia3in_torch", "peft_ia3_ff"],   # gated MLP's down_proj
    "krona": ["base", "spu_krona_triton", "spu_krona_torch", "peft_lokr"],
}


def build(kind: str, k: int, n: int, device="cuda", dtype=torch.bfloat16) -> nn.Module:
    torch.manual_seed(0)
    m = Proj(k, n).to(device, dtype)
    if kind == "base":
        return m.requires_grad_(False)
    if kind.startswith("peft_"):
        from peft import IA3Config, LoKrConfig, get_peft_model
        cfg = {"peft_ia3": lambda: IA3Config(target_modules=["proj"], feedforward_modules=[]),
               "peft_ia3_ff": lambda: IA3Config(target_modules=["proj"], feedforward_modules=["proj"]),
               "peft_lokr": lambda: LoKrConfig(r=LOKR_RANK, target_modules=["proj"])}[kind]()
        return get_peft_model(m, cfg).to(device, dtype)
    method, _, backend = kind.removeprefix("spu_").partition("_")
    if method in ("ia3", "ia3in"):
        from spu_kernels.modules import IA3Linear
        m.proj = IA3Linear(m.proj, side="output" if method == "ia3" else "input", adapter_dtype=dtype)
        with torch.no_grad():
            m.proj.ia3_l.uniform_(0.5, 1.5)
    elif method == "krona":
        from spu_kernels.modules import KronALinear
        m.proj = KronALinear(m.proj, adapter_dtype=dtype)
        with torch.no_grad():
            m.proj.krona_B.normal_(std=0.01)
    else:
        raise ValueError(kind)
    m.spu_backend = backend
    return m

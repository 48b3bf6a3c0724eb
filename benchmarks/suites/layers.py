"""``layers``: one adapted layer's forward+backward, bf16, against the frozen base ``nn.Linear``
and the matching PEFT layer, for every op and every backend the op has.

Groups (one report table each): LoRA / SiVA r=16 at dropout 0 and 0.1 (vs PEFT LoRA), (IA)³ on the
output (keys / values; vs PEFT IA3) and on the input (a gated MLP's down_proj; vs PEFT IA3 with
feedforward_modules), KronA and KronA init="kopa" (the same op over W_res; vs PEFT LoKr r=16),
data-dependent (IA)³ on the output (vs PEFT's static IA3: PEFT has no data-dependent form), the
bottleneck adapter r=64 on a projection's output (vs the same adapter as separate torch modules, as the
adapters library builds it: PEFT has no bottleneck adapter), and the ladder cross-attention (triton vs
its torch reference). A call is ``y = layer(x); y.backward(dy)``
with fresh grads (as in a training step: ``.grad`` set to None first, so no accumulation kernel is
timed); adapters are perturbed from their init so no kernel sees an all-zero factor or an all-ones scale.

The host suite builds its layers with ``build_layer`` too (tiny shapes, stand-in driver).
"""
from __future__ import annotations

import importlib

import torch
import torch.nn as nn

from benchmarks.measure import Case, Skip, Variant

SHAPES = [(8192, 4096, 4096), (8192, 4096, 11008), (16384, 768, 768), (2048, 4096, 4096)]    # (T, K, N)
SMOKE_SHAPES = [(48, 40, 24)]
RANK, ALPHA = 16, 32
SMOKE_RANK = 8
# targets on an H100, forward+backward time over the frozen base layer's (issues #2, #4, #14)
LOWRANK_TARGETS = {(8192, 4096, 4096): 1.10, (8192, 4096, 11008): 1.08, (16384, 768, 768): 1.30,
                   (2048, 4096, 4096): 1.25}
IA3_TARGET, KRONA_TARGET = 1.05, 1.15
LADDER_HEADS, LADDER_D, LADDER_K = 16, 128, 3          # RoBERTa-large's side network: d/r = 1024/8

# group -> (op module, PEFT kind, spu method); the kinds are base, peft_*, spu_<method>_<backend>
GROUPS = {
    "lowrank": ("lowrank_linear", "peft_lora", ("lora", "siva")),
    "ia3": ("ia3", "peft_ia3", ("ia3",)),
    "ia3_input": ("ia3", "peft_ia3_ff", ("ia3in",)),
    "krona": ("kron_linear", "peft_lokr", ("krona",)),
    "krona_kopa": ("kron_linear", "peft_lokr", ("kopa",)),        # init="kopa": the kron op over W_res
    "ia3_dynamic": ("ia3_dynamic", "peft_ia3", ("ia3dyn",)),      # PEFT has no data-dependent IA3: its static one
    "bottleneck": ("bottleneck_adapter", "torch_adapter", ("adapter",)),   # no PEFT bottleneck: unfused torch
}
ADAPTER_R = 64       # the bottleneck group's width (the harness's default r)


class UnfusedAdapter(nn.Module):
    """A frozen projection, then a bottleneck adapter as separate torch modules (down Linear, ReLU, up
    Linear, residual add: how the adapters library / adapter-transformers build it): the baseline of
    the fused ``bottleneck_adapter`` op, which PEFT has no counterpart of."""

    def __init__(self, proj: nn.Linear, r: int):
        super().__init__()
        self.proj = proj.requires_grad_(False)
        n = proj.out_features
        self.down, self.up = nn.Linear(n, r), nn.Linear(r, n)
        with torch.no_grad():
            self.up.weight.normal_(std=0.01)

    def forward(self, x):
        h = self.proj(x)
        return h + self.up(torch.relu(self.down(h)))


class Proj(nn.Module):
    """The layer under test as a module attribute ``proj`` (what PEFT's target_modules names)."""

    def __init__(self, k: int, n: int):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=False)

    def forward(self, x):
        return self.proj(x)


def implemented(op_module: str) -> tuple[str, ...]:
    return importlib.import_module(f"spu_kernels.ops.{op_module}").IMPLEMENTED


def backend_or_skip(op_module: str, backend: str, device: str) -> None:
    """Skip (with the reason) a backend this op cannot run with on this machine."""
    from spu_kernels.backends import resolve_backend
    try:
        resolve_backend(op_module, implemented(op_module), torch.device(device), backend)
    except (RuntimeError, ValueError) as e:
        raise Skip(str(e)) from None


def build_layer(kind: str, k: int, n: int, *, rank: int, dropout: float = 0.0, device: str,
                dtype=torch.bfloat16) -> nn.Module:
    """base | peft_lora | peft_ia3 | peft_ia3_ff | peft_lokr | torch_adapter |
    spu_<lora|siva|ia3|ia3in|ia3dyn|krona|kopa|adapter>_<backend>."""
    torch.manual_seed(0)
    m = Proj(k, n).to(device, dtype)
    if kind == "base":
        return m.requires_grad_(False)
    if kind == "torch_adapter":
        return UnfusedAdapter(m.proj, ADAPTER_R).to(device, dtype)
    if kind.startswith("peft_"):
        try:
            from peft import IA3Config, LoKrConfig, LoraConfig, get_peft_model
        except ImportError as e:
            raise Skip(f"peft is not installed ({e})") from None
        cfg = {"peft_lora": lambda: LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"],
                                               lora_dropout=dropout),
               "peft_ia3": lambda: IA3Config(target_modules=["proj"], feedforward_modules=[]),
               "peft_ia3_ff": lambda: IA3Config(target_modules=["proj"], feedforward_modules=["proj"]),
               "peft_lokr": lambda: LoKrConfig(r=rank, target_modules=["proj"])}[kind]()
        pm = get_peft_model(m, cfg).to(device, dtype)
        with torch.no_grad():           # off the identity init, as the spu layers below
            for name, p in pm.named_parameters():
                if p.requires_grad and "ia3_l" in name:
                    p.uniform_(0.5, 1.5)
                elif p.requires_grad and not p.any():        # LoRA's B, LoKr's w1: zero at init
                    p.normal_(std=0.01)
        return pm
    method, _, backend = kind.removeprefix("spu_").partition("_")
    from spu_kernels.modules import (
        BottleneckAdapterLinear,
        IA3DynamicLinear,
        IA3Linear,
        KronALinear,
        LoRALinear,
        SiVALinear,
    )
    with torch.no_grad():
        if method == "lora":
            m.proj = LoRALinear.from_linear(m.proj, r=rank, alpha=2 * rank, dropout=dropout, adapter_dtype=dtype)
            m.proj.lora_B.normal_(std=0.01)
        elif method == "siva":
            m.proj = SiVALinear.from_linear(m.proj, r=rank, dropout=dropout, adapter_dtype=dtype, keep_original=False)
        elif method in ("ia3", "ia3in"):
            m.proj = IA3Linear(m.proj, side="output" if method == "ia3" else "input", adapter_dtype=dtype)
            m.proj.ia3_l.uniform_(0.5, 1.5)
        elif method == "krona":
            m.proj = KronALinear(m.proj, adapter_dtype=dtype)
            m.proj.krona_B.normal_(std=0.01)
        elif method == "kopa":
            m.proj = KronALinear(m.proj, init="kopa", adapter_dtype=dtype)
        elif method == "ia3dyn":
            m.proj = IA3DynamicLinear(m.proj, side="output", adapter_dtype=dtype)
            m.proj.ia3_up.normal_(std=0.1)
        elif method == "adapter":
            m.proj = BottleneckAdapterLinear(m.proj, r=ADAPTER_R, adapter_dtype=dtype)
            m.proj.adapter_up.normal_(std=0.01)
        else:
            raise ValueError(f"unknown layer kind {kind!r}")
    m.spu_backend = backend
    return m


def layer_step(m: nn.Module, T: int, k: int, n: int, *, device: str, dtype=torch.bfloat16):
    """One forward+backward of ``m`` on (T, k) inputs, grads reset first; inputs made here, untimed."""
    import spu_kernels
    x = torch.randn(T, k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(T, n, device=device, dtype=dtype)
    params = [p for p in m.parameters() if p.requires_grad]
    backend = getattr(m, "spu_backend", None)

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        with spu_kernels.use_backend(backend):
            m(x).backward(dy)
    return step


def ladder_inputs(T: int, k: int, *, heads: int, d: int, device: str, dtype=torch.bfloat16):
    """q (T, h, d/h), C (k, T, d), W_k, W_v (d, d), dO: the ladder cross-attention's operands."""
    torch.manual_seed(0)
    q = torch.randn(T, heads, d // heads, device=device, dtype=dtype, requires_grad=True)
    c = torch.randn(k, T, d, device=device, dtype=dtype, requires_grad=True)
    wk = (torch.randn(d, d, device=device, dtype=dtype) / d ** 0.5).requires_grad_()
    wv = (torch.randn(d, d, device=device, dtype=dtype) / d ** 0.5).requires_grad_()
    return q, c, wk, wv, torch.randn_like(q)


def ladder_call(T: int, k: int, backend: str, *, heads: int, d: int, device: str, backward: bool = True):
    """The op alone on fresh operands: forward (and backward to q, C, W_k, W_v when ``backward``)."""
    from spu_kernels.ops import ladder_cross_attention
    backend_or_skip("ladder_cross_attention", backend, device)
    q, c, wk, wv, do = ladder_inputs(T, k, heads=heads, d=d, device=device)
    if not backward:
        return lambda: ladder_cross_attention(q, c, wk, wv, backend=backend)
    return lambda: torch.autograd.grad(ladder_cross_attention(q, c, wk, wv, backend=backend), (q, c, wk, wv), do)


def _backends(op_module: str, device: str, smoke: bool) -> list[str]:
    """Every backend the op has; a CPU smoke run keeps torch (the triton smoke case is its own)."""
    if smoke and device == "cpu":
        return ["torch"]
    return [b for b in ("triton", "cuda", "torch") if b in implemented(op_module)]


def _layer_variant(kind, T, k, n, *, rank, dropout, device, op_module=None):
    def setup():
        if op_module is not None:
            backend_or_skip(op_module, kind.rsplit("_", 1)[1], device)
        m = build_layer(kind, k, n, rank=rank, dropout=dropout, device=device)
        return layer_step(m, T, k, n, device=device)
    return Variant(kind, setup)


def cases(smoke: bool, device: str) -> list[Case]:
    shapes = SMOKE_SHAPES if smoke else SHAPES
    rank = SMOKE_RANK if smoke else RANK
    out = []
    for group, (op_module, peft_kind, methods) in GROUPS.items():
        for (T, k, n) in shapes:
            for p in ((0.0, 0.1) if group == "lowrank" else (0.0,)):
                variants = [_layer_variant("base", T, k, n, rank=rank, dropout=p, device=device),
                            _layer_variant(peft_kind, T, k, n, rank=rank, dropout=p, device=device)]
                for method in methods:
                    for b in _backends(op_module, device, smoke):
                        variants.append(_layer_variant(f"spu_{method}_{b}", T, k, n, rank=rank, dropout=p,
                                                       device=device, op_module=op_module))
                target = {"lowrank": LOWRANK_TARGETS.get((T, k, n)), "krona": KRONA_TARGET, "krona_kopa": KRONA_TARGET,
                          "ia3_dynamic": None, "bottleneck": None}.get(group, IA3_TARGET)
                suffix = f"/p{p:g}" if group == "lowrank" else ""
                out.append(Case(
                    suite="layers", name=f"{group}/T{T}_K{k}_N{n}{suffix}",
                    config=f"T={T} K={k} N={n}" + (f" r={rank} dropout={p:g}" if group == "lowrank" else "")
                    + (f" r={rank}" if group.startswith("krona") else "")
                    + (f" r={ADAPTER_R}" if group == "bottleneck" else ""),
                    dtype="bf16", variants=variants, reference="base", target=target,
                    target_kinds=tuple(f"spu_{m}_" for m in methods)))
    if smoke and device == "cpu":
        # the one Triton case of a CPU run, under the interpreter: tiny, the low-rank op at dropout 0
        T, k, n = shapes[0]
        out.append(Case(suite="layers", name=f"lowrank/T{T}_K{k}_N{n}/p0/interpreter",
                        config=f"T={T} K={k} N={n} r={rank} dropout=0 (Triton interpreter)", dtype="bf16",
                        variants=[_layer_variant("base", T, k, n, rank=rank, dropout=0.0, device=device),
                                  _layer_variant("spu_lora_triton", T, k, n, rank=rank, dropout=0.0, device=device,
                                                 op_module="lowrank_linear")],
                        reference="base"))
    for T in ((64,) if smoke else (2048, 16384)):
        heads, d = (4, 32) if smoke else (LADDER_HEADS, LADDER_D)
        variants = [Variant(f"spu_ladder_{b}", lambda T=T, b=b, heads=heads, d=d:
                            ladder_call(T, LADDER_K, b, heads=heads, d=d, device=device))
                    for b in ("torch", "triton") if not (smoke and device == "cpu" and b == "triton")]
        out.append(Case(suite="layers", name=f"ladder/T{T}_k{LADDER_K}",
                        config=f"T={T} k={LADDER_K} d={d} heads={heads}", dtype="bf16", variants=variants,
                        reference="spu_ladder_torch"))
    return out

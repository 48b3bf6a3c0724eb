"""The layers the low-rank benchmarks compare, built the same way for the pytest-benchmark suite and
the table script: the frozen base nn.Linear, PEFT LoRA, and spu_kernels' LoRALinear per backend."""
import torch
import torch.nn as nn

SHAPES = [(8192, 4096, 4096), (8192, 4096, 11008), (16384, 768, 768), (2048, 4096, 4096)]   # (T, K, N)
RANK = 16
ALPHA = 32
# issue #2's targets on an H100: fwd+bwd time relative to the frozen base layer
TARGETS = {(8192, 4096, 4096): 1.10, (8192, 4096, 11008): 1.08, (16384, 768, 768): 1.30, (2048, 4096, 4096): 1.25}


class Proj(nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=False)

    def forward(self, x):
        return self.proj(x)


def build(kind: str, k: int, n: int, dropout: float, device="cuda", dtype=torch.bfloat16) -> nn.Module:
    """kind: base | peft_lora | spu_triton | spu_torch | spu_cuda."""
    torch.manual_seed(0)
    m = Proj(k, n).to(device, dtype)
    if kind == "base":
        return m.requires_grad_(False)
    if kind == "peft_lora":
        from peft import LoraConfig, get_peft_model
        pm = get_peft_model(m, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=dropout))
        return pm.to(device, dtype)
    if kind.startswith("spu_"):
        from spu_kernels.modules import LoRALinear
        m.proj = LoRALinear.from_linear(m.proj, r=RANK, alpha=ALPHA, dropout=dropout, adapter_dtype=dtype)
        with torch.no_grad():
            m.proj.lora_B.normal_(std=0.01)
        m.spu_backend = kind.removeprefix("spu_")
        return m
    raise ValueError(kind)


def time_and_peak(f) -> tuple[float, float]:
    """(median ms, peak MiB allocated beyond what was live before) of the callable ``f``, after warm-up."""
    from triton.testing import do_bench
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    f()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return do_bench(f, warmup=50, rep=300, return_mode="median"), peak


def step_fn(m: nn.Module, T: int, k: int, n: int, device="cuda", dtype=torch.bfloat16):
    """One forward+backward of ``m`` (inputs prepared outside the timed region)."""
    import spu_kernels
    x = torch.randn(T, k, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(T, n, device=device, dtype=dtype)
    backend = getattr(m, "spu_backend", None)

    def f():
        with spu_kernels.use_backend(backend):
            m(x).backward(g)
    return f

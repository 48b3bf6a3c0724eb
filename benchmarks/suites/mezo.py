"""``mezo``: a MeZO step against inference on the same model and batch (RoBERTa-large-sized,
random weights, bf16 weights, batch 16 × 128): its peak memory over two no-grad forward passes'
(target ≤ 1.1×: MeZO should train in inference memory) and its time over theirs (a step is two
forwards plus three memory-bound sweeps over the trainable parameters). Two cases: MeZO on all
parameters, and on spu LoRA adapters (r = 8, query and value)."""
from __future__ import annotations

import torch

from benchmarks.measure import Case, Variant

CONFIG = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
              max_position_embeddings=130, vocab_size=50265)
SMOKE_CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=40, vocab_size=100)
BATCH, SEQ = 16, 128
SMOKE_BATCH, SMOKE_SEQ = 2, 16
MEMORY_TARGET = 1.1


def _setup(trainable: str, kind: str, smoke: bool, device: str):
    def setup():
        import transformers as tf

        import spu_kernels
        from spu_kernels.optim import MeZO
        torch.manual_seed(0)
        cfg = tf.RobertaConfig(num_labels=2, **(SMOKE_CONFIG if smoke else CONFIG))
        with torch.device(device):
            model = tf.RobertaForSequenceClassification(cfg).to(torch.bfloat16)
        if trainable == "lora":
            spu_kernels.patch(model, "lora", r=8, adapter_dtype="bfloat16")
        b, s = (SMOKE_BATCH, SMOKE_SEQ) if smoke else (BATCH, SEQ)
        g = torch.Generator().manual_seed(1)
        batch = dict(input_ids=torch.randint(3, cfg.vocab_size, (b, s), generator=g).to(device),
                     labels=torch.randint(0, 2, (b,), generator=g).to(device))

        def forward():
            with torch.no_grad():
                return model(**batch).loss
        if kind == "two_forwards":
            return lambda: (forward(), forward())
        opt = MeZO([p for p in model.parameters() if p.requires_grad], lr=1e-6, eps=1e-3)
        return lambda: opt.step(forward)
    return setup


def cases(smoke: bool, device: str) -> list[Case]:
    b, s = (SMOKE_BATCH, SMOKE_SEQ) if smoke else (BATCH, SEQ)
    return [Case(suite="mezo", name=f"roberta-large/{trainable}",
                 config=f"RoBERTa-large-sized{' (tiny)' if smoke else ''}, batch {b}x{s}, MeZO on "
                        + ("all parameters" if trainable == "full" else "spu LoRA r=8 (q, v)"),
                 dtype="bf16", reference="two_forwards", memory="absolute", items_per_call=b,
                 target=MEMORY_TARGET, target_kinds=("mezo_step",), target_metric="peak_mib",
                 variants=[Variant(kind, _setup(trainable, kind, smoke, device))
                           for kind in ("two_forwards", "mezo_step")])
            for trainable in ("full", "lora")]

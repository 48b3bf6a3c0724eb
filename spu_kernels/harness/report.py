"""The Table 1 layout: one row per method -- accuracy, F1, peak memory, training samples/s,
trainable parameters, wall time -- printed, and written as markdown, CSV and a PNG plot
(accuracy vs peak memory, marker area ~ samples/s). Classification and text-to-text runs
(``task: text2text``) share it; the caption says how text-to-text rows predict (rank classification,
or exact match of greedy output: ``text2text_eval``)."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from .deps import missing_message

COLUMNS = ("method", "accuracy", "f1", "peak_memory_mb", "samples_per_s", "trainable_params", "trainable_pct",
           "wall_s")
HEADERS = ("Method", "Accuracy", "F1", "Peak memory (MB)", "Samples/s", "Trainable params", "Trainable %",
           "Wall time (s)")


def _row(r) -> dict:
    d = r.to_dict() if hasattr(r, "to_dict") else dict(r)
    d["trainable_pct"] = 100.0 * d["trainable_params"] / max(1, d["total_params"])
    return d


def _fmt(col: str, v) -> str:
    if col in ("accuracy", "f1"):
        return f"{100 * v:.2f}"
    if col in ("peak_memory_mb", "wall_s"):
        return f"{v:.0f}"
    if col == "samples_per_s":
        return f"{v:.1f}"
    if col == "trainable_params":
        return f"{v:,}"
    if col == "trainable_pct":
        return f"{v:.3f}"
    return str(v)


def _processes(r: dict) -> str:
    """How the run was spread: '' for one process without gradient accumulation, else the process count,
    DDP / FSDP2, the micro-batches per step and the global batch (samples per optimizer step)."""
    world, accumulate = r.get("world_size", 1), r.get("gradient_accumulation_steps", 1)
    if accumulate > 1:
        procs = f"{world} processes ({'FSDP2' if r.get('fsdp') else 'data parallel'}), " if world > 1 else ""
        return f", {procs}{accumulate} micro-batches a step, global batch {r.get('global_batch_size')}"
    if world <= 1:
        return ""
    how = "FSDP2" if r.get("fsdp") else "data parallel"
    return f", {world} processes ({how}), global batch {r.get('global_batch_size')}"


def caption(results) -> str:
    r = _row(results[0])
    kinds = sorted({_row(x)["memory_kind"] for x in results})
    return (f"{r['model']} on {r['dataset']}: {r['n_train']} train / {r['n_val']} val / {r['n_test']} test sentences, "
            f"max_length {r['max_length']}; {r['device']}, {r['precision']}{_processes(r)}. Accuracy and F1 (%) on "
            "the test split "
            f"at the best validation epoch; peak memory = {', '.join(kinds)}; samples/s = training samples per "
            f"second of training steps (no evaluation).{_task_note(results)}")


_EVALS = {"rank": "by rank classification (the class whose target sequence has the highest summed log-probability)",
          "generate": "by exact match of greedy output (lower-cased, whitespace normalised) to a class's target "
                      "words; an output matching no class counts as wrong"}


def _task_note(results) -> str:
    """How text-to-text rows predict (task: text2text; text2text_eval rank or generate), or ''."""
    rows = [_row(x) for x in results if _row(x).get("task") == "text2text"]
    if not rows:
        return ""
    mode = {id(r): r.get("text2text_eval") or "rank" for r in rows}     # results written before the key: rank
    modes = sorted(set(mode.values()))
    if len(modes) == 1:
        how = f"predicts {_EVALS[modes[0]]}"
    else:
        how = "predicts " + "; ".join(", ".join(str(r["method"]) for r in rows if mode[id(r)] == m) + f": {_EVALS[m]}"
                                      for m in modes)
    return f" Text-to-text rows: the seq2seq LM is trained to generate each class's target words, and {how}."


def table_text(results) -> str:
    rows = [[_fmt(c, _row(r)[c]) for c in COLUMNS] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(HEADERS)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(HEADERS), line(["-" * w for w in widths])] + [line(r) for r in rows])


def table_markdown(results) -> str:
    rows = [[_fmt(c, _row(r)[c]) for c in COLUMNS] for r in results]
    out = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n\n" + caption(results) + "\n"


def write_csv(results, path: Path) -> Path:
    extra = ("total_params", "memory_kind", "learning_rate", "epochs", "steps", "val_accuracy", "val_f1",
             "best_epoch", "device", "precision", "model", "dataset", "n_train", "n_val", "n_test", "max_length",
             "train_s", "world_size", "global_batch_size", "gradient_accumulation_steps", "fsdp", "task",
             "text2text_eval")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS + extra)
        for r in results:
            d = _row(r)
            w.writerow([d.get(c) for c in COLUMNS + extra])
    return path


def plot(results, path: Path) -> Path | None:
    """Accuracy vs peak memory, marker area proportional to samples/s. None (and a note on stderr)
    if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"spu-kernels: no {path.name}: {missing_message('matplotlib', 'the plot')}", file=sys.stderr)
        return None
    rows = [_row(r) for r in results]
    fast = max(r["samples_per_s"] for r in rows) or 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for r in rows:
        size = 40 + 600 * r["samples_per_s"] / fast
        ax.scatter(r["peak_memory_mb"], 100 * r["accuracy"], s=size, alpha=0.6)
        ax.annotate(f"{r['method']}\n{r['samples_per_s']:.0f}/s", (r["peak_memory_mb"], 100 * r["accuracy"]),
                    textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel(f"peak memory (MB, {rows[0]['memory_kind']})")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{rows[0]['model']}: accuracy vs memory (marker size ~ samples/s)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.margins(0.2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_all(results, out_dir: Path, stem: str = "table") -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / f"{stem}.md", "csv": out_dir / f"{stem}.csv"}
    paths["markdown"].write_text(table_markdown(results))
    write_csv(results, paths["csv"])
    png = plot(results, out_dir / f"{stem}.png")
    if png is not None:
        paths["png"] = png
    return paths

"""``python -m benchmarks.report [--results DIR] [--markdown FILE] [--plots DIR] [--check]``: the
CSVs under benchmarks/results/ become the generated blocks of benchmarks/RESULTS.md and PNG plots.

RESULTS.md is prose by people with blocks by this script between ``<!-- generated: NAME -->`` and
``<!-- /generated: NAME -->``; only the blocks are rewritten. Each table shows one device's newest
run of a suite, headed by the GPU (or CPU), versions, commit and date of its rows. ``--check``
writes nothing and exits 1 if RESULTS.md is not what the CSVs give (CI runs it: no hand-typed
numbers).
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import re
import sys
from collections import OrderedDict

from benchmarks.schema import RESULTS_DIR, ROOT, read_rows

MARKDOWN = os.path.join(ROOT, "benchmarks", "RESULTS.md")
PLOTS_DIR = os.path.join(ROOT, "benchmarks", "plots")
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated: (?P=name) -->)", re.S)
PENDING = "*Pending: no run of this suite yet. On a GPU: `make gpu-report` (benchmarks/README.md).*\n"


def _num(v: str) -> float:
    return float(v) if v not in ("", None) else math.nan


def latest_runs(rows: list[dict], suite: str) -> list[list[dict]]:
    """Per device (GPU or CPU name), the rows of its newest run that has this suite; devices sorted."""
    by_device: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        if r["suite"] == suite:
            by_device.setdefault(r["gpu"], {}).setdefault(r["run_id"], []).append(r)
    return [runs[max(runs)] for _, runs in sorted(by_device.items())]


def header(run: list[dict]) -> str:
    r = run[0]
    driver = f", driver {r['driver']}" if r["driver"] else ""
    return (f"**{r['gpu']}** · CUDA {r['cuda']}{driver} · torch {r['torch']} · triton {r['triton']} · "
            f"transformers {r['transformers']} · peft {r['peft']} · spu_kernels {r['spu_kernels']} "
            f"({r['commit']}) · {r['date']} · run {r['run_id']}\n")


def _index(run: list[dict]) -> "OrderedDict[tuple, dict[str, dict]]":
    """(case, kind) -> {metric: row}, in measurement order."""
    out: OrderedDict = OrderedDict()
    for r in run:
        out.setdefault((r["case"], r["kind"]), {})[r["metric"]] = r
    return out


def _unique(seq):
    return list(OrderedDict.fromkeys(seq))


def _status(metrics: dict[str, dict]) -> str | None:
    """'failed' / 'skipped' (with the reason's start) for a variant that has no numbers."""
    for r in metrics.values():
        if r["note"]:
            word, _, why = r["note"].partition(": ")
            return f"{word} ({why[:70]}{'…' if len(why) > 70 else ''})"
    return None


def _x(r: dict | None) -> str:
    return f"{_num(r['ratio']):.2f}×" if r and r["ratio"] else "–"


def _table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _cell_time(m: dict[str, dict], time_metric="time_ms", unit="ms", mem=True) -> str:
    st = _status(m)
    if st:
        return st
    t = m.get(time_metric)
    if t is None:
        return "–"
    cell = f"{_x(t)} ({_num(t['value']):.4g} {unit}"
    extra = m.get("peak_extra_mib")
    if mem and extra:
        cell += f", +{_num(extra['value']):.0f} MiB"
    return cell + ")"


def render_grouped(run: list[dict], time_metric="time_ms", unit="ms", note="") -> str:
    """One table per group: rows = configs, columns = kinds (ratio to the reference, time, memory)."""
    idx = _index(run)
    cases_of = OrderedDict()
    for r in run:
        cases_of.setdefault(_group_of(r), []).append(r)
    out = [header(run), note] if note else [header(run)]
    for group, grows in cases_of.items():
        kinds = _unique(r["kind"] for r in grows)
        ref = grows[0]["reference"]
        targets = OrderedDict()
        for r in grows:
            if r["target"]:
                targets[r["case"]] = r["target"]
        head = ["config"] + [f"{k}" for k in kinds] + (["target"] if targets else [])
        body = []
        for case in _unique(r["case"] for r in grows):
            config = next(r["config"] for r in grows if r["case"] == case)
            row = [config] + [_cell_time(idx[(case, k)], time_metric, unit) if (case, k) in idx else ""
                              for k in kinds]
            if targets:
                row.append(f"≤ {_num(targets[case]):.2f}×" if case in targets else "")
            body.append(row)
        out.append(f"\n*{group}* (ratio to `{ref}`)\n\n" + _table(head, body))
    return "".join(out)


def _group_of(r: dict) -> str:
    """A case's table: its name's first part, and the dropout part of a low-rank case ("lowrank p0.1")."""
    case = r["case"]
    parts = case.split("/")
    return parts[0] + (" " + parts[2] if len(parts) > 2 and parts[2].startswith("p") else "")


def _per_variant(run: list[dict], cells, width: int) -> list[list[str]]:
    """[config, kind, *cells(metrics)] per measured (case, kind) in ``run``; a skipped or failed
    variant's cells say so and why."""
    body = []
    for (case, kind), m in _index(run).items():
        config = next(r["config"] for r in run if r["case"] == case)
        st = _status(m)
        body.append([config, kind] + ([st] + [""] * (width - 1) if st else cells(m)))
    return body


def _value(r: dict | None, fmt: str) -> str:
    return format(_num(r["value"]), fmt) if r else "–"


def render_models(run: list[dict]) -> str:
    def cells(m):
        sps, peak, gb = m.get("samples_per_s"), m.get("peak_mib"), m.get("graph_breaks")
        return [_value(sps, ".1f"), _x(sps), _value(peak, ".0f"), _x(peak), _value(m.get("time_ms"), ".2f"),
                _value(gb, ".0f") if gb else ""]
    out = [header(run)]
    for case in _unique(r["case"] for r in run):
        rows = [r for r in run if r["case"] == case]
        body = [row[1:] for row in _per_variant(rows, cells, 6)]
        out.append(f"\n*{rows[0]['config']}* (ratios to full fine-tuning in the same run)\n\n"
                   + _table(["method", "samples/s", "× full", "peak MiB", "× full", "ms/step", "graph breaks"], body))
    return "".join(out)


def _target(r: dict | None, fmt) -> str:
    return fmt(_num(r["target"])) if r and r["target"] else ""


def render_mezo(run: list[dict]) -> str:
    def cells(m):
        t, p = m.get("time_ms"), m.get("peak_mib")
        return [_value(t, ".2f"), _x(t), _value(p, ".0f"), _x(p), _target(p, lambda v: f"≤ {v:.2f}×")]
    return header(run) + "\n" + _table(["case", "kind", "ms", "× 2 forwards", "peak MiB", "× 2 forwards",
                                        "memory target"], _per_variant(run, cells, 5))


def render_ladder(run: list[dict]) -> str:
    def cells(m):
        t, g, h = m.get("time_ms"), m.get("gbps"), m.get("hbm_share")
        return [_value(t, ".4g"), _x(t), _value(g, ".0f"), f"{100 * _num(h['value']):.0f} %" if h else "–",
                _target(h, lambda v: f"≥ {100 * v:.0f} %")]
    return header(run) + "\n" + _table(["case", "kind", "ms", "× torch", "GB/s", "HBM share", "target"],
                                        _per_variant(run, cells, 5))


def render_host(run: list[dict]) -> str:
    body = []
    for case in _unique(r["case"] for r in run):
        rows = [r for r in run if r["case"] == case]
        peft = next((r for r in rows if r["kind"].startswith("peft_") and r["metric"] == "host_us"), None)
        peft_us = _num(peft["value"]) if peft else math.nan

        def cells(m, peft_us=peft_us):
            h, launches = m["host_us"], m.get("launches")
            is_spu = h["kind"].startswith("spu_") and peft_us == peft_us
            vs_peft = f"{_num(h['value']) / peft_us:.2f}×" if is_spu else ""
            return [_value(h, ".0f"), f"{_num(h['p20']):.0f}–{_num(h['p80']):.0f}", _x(h), vs_peft,
                    _value(launches, ".0f") if launches else ""]
        body += [[case] + row for row in _per_variant(rows, cells, 5)]
    return header(run) + "\n" + _table(["case", "config", "kind", "host µs (median)", "20–80 %", "× base",
                                        "× PEFT", "launches"], body)


def render_gpu_tests(run: list[dict]) -> str:
    m = {r["metric"]: r for r in run}
    failing = next((r["note"] for r in run if r["note"]), "")
    cells = [f"{_num(m[k]['value']):.0f}" if k in m else "–" for k in ("passed", "failed", "skipped")]
    return header(run) + "\n" + _table(["passed", "failed", "skipped", "failing tests"], [cells + [failing or "none"]])


RENDERERS = OrderedDict([
    ("gpu-tests", render_gpu_tests),
    ("layers", render_grouped),
    ("models", render_models),
    ("mezo", render_mezo),
    ("ladder", render_ladder),
    ("host", render_host),
])


def render_block(rows: list[dict], name: str) -> str:
    runs = latest_runs(rows, name)
    if not runs:
        return PENDING
    return "\n".join(RENDERERS[name](run) for run in runs)


def render(rows: list[dict], text: str, source: str = "RESULTS.md") -> str:
    """``text`` with every generated block rewritten from ``rows``; an unknown block is an error."""
    def block(m):
        name = m.group("name")
        if name not in RENDERERS:
            raise ValueError(f"{source}: unknown generated block {name!r}; the blocks are {', '.join(RENDERERS)}")
        return m.group(1) + render_block(rows, name) + m.group(4)
    missing = [n for n in RENDERERS if f"<!-- generated: {n} -->" not in text]
    if missing:
        raise ValueError(f"{source} has no generated block for {', '.join(missing)}: add "
                         + ", ".join(f"'<!-- generated: {n} -->' / '<!-- /generated: {n} -->'" for n in missing))
    return BLOCK.sub(block, text)


def plot(rows: list[dict], out_dir: str) -> list[str]:
    """PNG plots of each device's newest layers and models runs; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    os.makedirs(out_dir, exist_ok=True)
    for run in latest_runs(rows, "layers"):
        shapes = _unique(r["config"].split(" r=")[0] for r in run if r["case"].startswith("lowrank/"))
        if not shapes:
            continue
        fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 5), squeeze=False)
        for ax, shape in zip(axes[0], shapes):
            bars = [r for r in run if r["metric"] == "time_ms" and r["config"].startswith(shape + " ")
                    or r["metric"] == "time_ms" and r["config"] == shape]
            bars = [r for r in bars if r["kind"] != r["reference"] and r["ratio"]]
            labels = [f"{_group_of(r)}: {r['kind']}" for r in bars]
            ax.barh(range(len(bars)), [_num(r["ratio"]) for r in bars],
                    color=["tab:orange" if r["kind"].startswith("peft") else "tab:blue" for r in bars])
            for i, r in enumerate(bars):
                if r["target"]:
                    ax.plot([_num(r["target"])] * 2, [i - 0.4, i + 0.4], color="red", lw=2)
            ax.axvline(1.0, color="gray", lw=0.8)
            ax.set_yticks(range(len(bars)), labels, fontsize=7)
            ax.set_title(shape, fontsize=9)
            ax.set_xlabel("fwd+bwd time / frozen base (red: target)")
        fig.suptitle(f"layers on {run[0]['gpu']} ({run[0]['date']})")
        fig.tight_layout()
        written.append(_save(fig, out_dir, "layers", run))
        plt.close(fig)
    for run in latest_runs(rows, "models"):
        cases = _unique(r["case"] for r in run)
        fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 5), squeeze=False)
        for ax, case in zip(axes[0], cases):
            idx = {k: m for (c, k), m in _index(run).items() if c == case}
            for kind, m in idx.items():
                if "samples_per_s" not in m or "peak_mib" not in m:
                    continue
                x, y = _num(m["samples_per_s"]["value"]), _num(m["peak_mib"]["value"])
                marker = "s" if kind.startswith("full") else "^" if kind.startswith("peft") else "o"
                hollow = kind.endswith(("+compile", "+cudagraphs"))
                ax.scatter([x], [y], marker=marker, facecolors="none" if hollow else None)
                ax.annotate(kind, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel("samples/s")
            ax.set_ylabel("peak memory (MiB)")
            ax.set_title(next(r["config"] for r in run if r["case"] == case), fontsize=9)
        fig.suptitle(f"whole training step on {run[0]['gpu']} ({run[0]['date']})")
        fig.tight_layout()
        written.append(_save(fig, out_dir, "models", run))
        plt.close(fig)
    return written


def _save(fig, out_dir: str, what: str, run: list[dict]) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", run[0]["gpu"].lower()).strip("-")[:40]
    path = os.path.join(out_dir, f"{what}-{slug}.png")
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=RESULTS_DIR, help="folder of result CSVs (not searched recursively)")
    ap.add_argument("--markdown", default=MARKDOWN, help="the RESULTS.md to rewrite")
    ap.add_argument("--plots", default=PLOTS_DIR, help="folder for the PNG plots")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if the markdown is out of date")
    args = ap.parse_args(argv)
    paths = sorted(glob.glob(os.path.join(args.results, "*.csv")))
    rows = read_rows(paths)
    with open(args.markdown) as f:
        text = f.read()
    new = render(rows, text, args.markdown)
    if args.check:
        if new != text:
            print(f"{args.markdown} is not what {args.results}/*.csv give: run `python -m benchmarks.report`",
                  file=sys.stderr)
            return 1
        print(f"{args.markdown} matches {len(rows)} rows of {len(paths)} CSV file(s)")
        return 0
    if new != text:
        with open(args.markdown, "w") as f:
            f.write(new)
    written = [] if args.no_plots else plot(rows, args.plots)
    print(f"{args.markdown}: {len(rows)} rows from {len(paths)} CSV file(s); plots: {', '.join(written) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark runner: ``python -m benchmarks.run [SUITE ...] [--smoke] [--out DIR] [--resume] [--budget-s S]``.

Runs the suites' cases variant by variant, appends one row per metric to ``DIR/<device>.csv``
(benchmarks/schema.py) as soon as it is measured, and prints a line per variant. Ratios divide by
the case's reference kind measured in the same run. ``--resume`` continues the device's newest run
(if it measured the same sources),
skipping what it already has (how ``make gpu-report PART=N`` splits the work into parts);
``--budget-s`` stops before starting a variant once that many seconds have passed (exit status 3).
``--smoke`` runs every suite on tiny shapes (on a CPU: torch backend, one Triton case under the
interpreter) and fails if any variant fails: CI's check that the suites still work.

Exit status: 0 done, 1 a variant failed under --strict/--smoke, 2 bad arguments, 3 budget reached.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import subprocess
import sys
import time
import traceback

SUITES = ("layers", "models", "mezo", "ladder", "host")
BUDGET_REACHED = 3


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("suites", nargs="*", help=f"suites to run (default: all of {', '.join(SUITES)})")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; CPU-friendly; any failure fails the run")
    ap.add_argument("--out", default=None,
                    help="results folder (default benchmarks/results, smoke: benchmarks/results/smoke)")
    ap.add_argument("--resume", action="store_true", help="continue this device's newest run, skipping what it has")
    ap.add_argument("--budget-s", type=float, default=None, help="start no variant after this many seconds")
    ap.add_argument("--cases", default=None, help="regex: run only the cases whose name matches")
    ap.add_argument("--kinds", default=None, help="regex: run only the kinds that match (the reference always runs)")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any variant failed (implied by --smoke)")
    ap.add_argument("--list", action="store_true", help="list the cases and kinds, measure nothing")
    ap.add_argument("--run-id", default=None, help=argparse.SUPPRESS)       # a parent run's id, for isolated suites
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        ap.error(f"unknown suite(s) {', '.join(unknown)}; the suites are {', '.join(SUITES)}")
    for name in ("cases", "kinds"):
        pattern = getattr(args, name)
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                ap.error(f"--{name} {pattern!r} is not a regular expression: {e}")
    if args.budget_s is not None and args.budget_s <= 0:
        ap.error("--budget-s must be > 0")
    args.suites = args.suites or list(SUITES)
    args.strict = args.strict or args.smoke
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.child:
        # the one Triton case of a CPU run goes through the interpreter, which must be on before any kernel
        # is imported (isolated suites set their own environment)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from benchmarks import schema
    from benchmarks.measure import release

    out_dir = args.out or os.path.join(schema.RESULTS_DIR, "smoke" if args.smoke else "")
    env = schema.environment(device)
    csv_path = os.path.join(out_dir, schema.csv_name(env))
    existing = schema.read_rows([csv_path]) if os.path.exists(csv_path) else []
    run_id = args.run_id or _resumable_run(existing, env, args.resume) or schema.new_run_id()
    done = {(r["suite"], r["case"], r["kind"]) for r in existing if r["run_id"] == run_id}
    # reference values of this run, for the ratios: (suite, case, metric) -> value
    refs: dict[tuple[str, str, str], float] = {}
    for r in existing:
        if r["run_id"] == run_id and r["kind"] == r["reference"] and r["value"] not in ("", "nan"):
            refs[(r["suite"], r["case"], r["metric"])] = float(r["value"])

    start = time.monotonic()
    failures = 0
    print(f"benchmarks.run: run {run_id} on {env['gpu']} ({env['commit']}) -> {csv_path}", flush=True)
    for suite_name in args.suites:
        suite = importlib.import_module(f"benchmarks.suites.{suite_name}")
        if getattr(suite, "ISOLATED", False) and not args.child:
            status = _run_isolated(suite_name, args, run_id, out_dir, start)
            if status == BUDGET_REACHED:
                return status
            failures += status == 1
            continue
        cases = suite.cases(smoke=args.smoke, device=device)
        if args.cases:
            cases = [c for c in cases if re.search(args.cases, c.name)]
        for case in cases:
            variants = [v for v in case.variants
                        if v.kind == case.reference or not args.kinds or re.search(args.kinds, v.kind)]
            if args.list:
                print(f"{suite_name:7s} {case.name:45s} {case.config:45s} " + " ".join(v.kind for v in variants))
                continue
            pending = [v for v in variants if (suite_name, case.name, v.kind) not in done]
            # host timings take turns within a case (a noisy host's slow spells then hit every kind alike);
            # the rest is measured, and its rows written, one variant at a time
            for batch in ([pending] if case.host_timing and pending else [[v] for v in pending]):
                if args.budget_s is not None and time.monotonic() - start > args.budget_s:
                    print(f"benchmarks.run: budget of {args.budget_s:.0f} s reached; continue with --resume",
                          flush=True)
                    return BUDGET_REACHED
                for kind, rows, failed in _measure_batch(case, batch, device, args.smoke):
                    failures += failed
                    _complete_rows(rows, case, kind, refs, run_id=run_id, **env)
                    schema.append_rows(csv_path, rows)
                    print(_progress_line(case, kind, rows), flush=True)
                release()
    if args.list:
        return 0
    print(f"benchmarks.run: done in {time.monotonic() - start:.0f} s; {failures} failed variant(s); rows in {csv_path}",
          flush=True)
    return 1 if failures and args.strict else 0


def _resumable_run(existing: list[dict], env: dict, resume: bool) -> str | None:
    """With --resume, the newest run on this device if it measured these same sources (rows of one run
    come from one version of the code), else None (a new run)."""
    runs = {r["run_id"]: r["commit"] for r in existing if r["gpu"] == env["gpu"]}
    if not resume or not runs:
        return None
    newest = max(runs)
    if runs[newest].split("src:")[-1] != env["commit"].split("src:")[-1]:
        print(f"benchmarks.run: the newest run {newest} measured other sources ({runs[newest]}); starting a new run",
              flush=True)
        return None
    return newest


def _complete_rows(rows: list[dict], case, kind: str, refs: dict, **columns) -> None:
    """Fill in the ratio to the case's reference (remembering the reference's own values), the target
    where it applies, and the case, run and environment columns."""
    from benchmarks.schema import UNITS
    for row in rows:
        key = (case.suite, case.name, row["metric"])
        measured = row["value"] == row["value"]
        if kind == case.reference and measured:
            refs[key] = row["value"]
        row["ratio"] = row["value"] / refs[key] if measured and refs.get(key) else None
        row.update(suite=case.suite, case=case.name, config=case.config, dtype=case.dtype, reference=case.reference,
                   unit=UNITS[row["metric"]], target=case.target if _targeted(case, kind, row["metric"]) else None,
                   **columns)


def _targeted(case, kind: str, metric: str) -> bool:
    return (case.target is not None and metric == (case.target_metric or case.headline)
            and any(kind.startswith(p) for p in case.target_kinds))


def _measure_batch(case, batch, device, smoke):
    """[(kind, rows without the run / environment columns, 1 if it failed else 0)] in ``batch``'s order:
    one variant, or several whose host timings take turns (measure.cpu_times)."""
    from benchmarks.measure import Skip, allocated, cpu_times, measure
    results, ready = {}, []
    floor = allocated()                       # before any setup: a whole step's footprint is measured above it
    for variant in batch:
        try:
            fn = variant.setup()
            if len(batch) > 1:
                fn()                          # first calls: compilation, lazy init
                fn()
            ready.append((variant.kind, fn))
        except Exception as e:
            results[variant.kind] = _error_rows(case, variant.kind, e, Skip)
    times = None
    if len(batch) > 1 and ready:
        scale = 0.05 if smoke else 1.0
        times = cpu_times([fn for _, fn in ready], case.warmup_ms * scale, case.rep_ms * scale,
                          3 if smoke else 20, rounds=1 if smoke else 10)
    for i, (kind, fn) in enumerate(ready):
        try:
            metrics = measure(case, fn, device, smoke, times=None if times is None else times[i],
                              allocated_before_setup=floor)
            if case.probe is not None:
                metrics += [(m, v, None, None) for m, v in case.probe(kind, fn).items()]
            results[kind] = ([dict(kind=kind, metric=m, value=float(v), p20=p20, p80=p80, note="")
                              for m, v, p20, p80 in metrics], 0)
        except Exception as e:
            results[kind] = _error_rows(case, kind, e, Skip)
    return [(v.kind, *results[v.kind]) for v in batch]


def _error_rows(case, kind, e, Skip):
    """A skipped variant is a row saying why; a failed one is recorded, not fatal: one kind failing must
    not lose the rest of a GPU run."""
    if isinstance(e, Skip):
        return [dict(kind=kind, metric=case.headline, value=math.nan, note=f"skipped: {e}")], 0
    traceback.print_exc()
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return [dict(kind=kind, metric=case.headline, value=math.nan, note=f"failed: {msg[:300]}")], 1


def _progress_line(case, kind: str, rows: list[dict]) -> str:
    cells = []
    for r in rows:
        if r["value"] != r["value"]:
            cells.append(r["note"])
            continue
        ratio = f" ({r['ratio']:.2f}x {case.reference})" if r.get("ratio") and r["metric"] != "launches" else ""
        cells.append(f"{r['metric']}={r['value']:.4g}{ratio}")
    return f"  {case.suite} {case.name} {kind}: " + ", ".join(cells)


def _run_isolated(suite_name, args, run_id, out_dir, start) -> int:
    """Run a suite that patches process-wide state (the host suite's stand-in Triton driver) in a child
    process without a GPU and without the interpreter, under the same run id."""
    cmd = [sys.executable, "-m", "benchmarks.run", suite_name, "--child", "--run-id", run_id, "--out", out_dir]
    for flag, on in (("--smoke", args.smoke), ("--strict", args.strict)):
        if on:
            cmd.append(flag)
    for flag in ("cases", "kinds"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    if args.list:
        cmd.append("--list")
    if args.budget_s is not None:
        cmd += ["--budget-s", str(max(1.0, args.budget_s - (time.monotonic() - start)))]
    child_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child_env["CUDA_VISIBLE_DEVICES"] = ""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(cmd, env=child_env, cwd=root).returncode


if __name__ == "__main__":
    sys.exit(main())

"""``make gpu-report [PART=N]``: prove the package on the GPU of this machine in parts that each fit in
a 10-minute command, leaving CSV rows and a regenerated RESULTS.md behind.

    python -m benchmarks.gpu_report              # everything, no time limit
    python -m benchmarks.gpu_report --part 1     # build _C for this GPU, the test suite on the GPU
    python -m benchmarks.gpu_report --part 2     # the suites, until the budget; then --part 3, 4, ...

Part 1 starts a new run: it builds spu_kernels._C in place for the visible GPU (when nvcc is there
and it is not built yet), runs the test suite on the GPU (``make test-gpu``: every backend against
the reference; its pass/fail counts become rows of the run, and a failure makes this exit 1: fix
that first) and so warms Triton's cache. Parts 2 and on resume the run: they run the suites in
order (layers, models, mezo, ladder, host) and stop starting new measurements after ``--budget-s``
(default 420 s), so a part ends in under 8 minutes; the next part goes on where it stopped. Each
part ends by regenerating RESULTS.md and the plots and, when ``$OUT`` is set (the device tool),
copying the CSVs, RESULTS.md, the plots and the test log there. Exit 0: done, 3: more parts to
run, 1: tests or measurements failed.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

from benchmarks import report, run, schema

ORDER = ["layers", "models", "mezo", "ladder", "host"]      # host last: it needs no GPU
BUDGET_S = 420.0
ROOT = schema.ROOT
LOG = os.path.join(schema.RESULTS_DIR, "logs")


def _sh(cmd: list[str], log: str, timeout: float | None = None, env: dict | None = None) -> int:
    """Run ``cmd`` from the repository root, teeing its output into ``log``; returns its exit status."""
    print("$", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})})
        start = time.monotonic()
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
            if timeout is not None and time.monotonic() - start > timeout:
                proc.kill()
                f.write(f"[killed after {timeout:.0f} s]\n")
                print(f"[killed after {timeout:.0f} s]", flush=True)
                return 124
        return proc.wait()


def _extension_loads() -> bool:
    code = "import spu_kernels._extension as e; import sys; sys.exit(0 if e.extension_error() is None else 1)"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def build_extension(log: str) -> bool:
    """spu_kernels._C for the visible GPU's architecture, in place, unless it loads already; True if it loads."""
    if _extension_loads():
        print("spu_kernels._C loads; not rebuilding", flush=True)
        return True
    import torch
    cc = "{}.{}".format(*torch.cuda.get_device_capability())
    env = {"SPU_BUILD_CUDA": "1", "SPU_CUDA_ARCHS": cc, "MAX_JOBS": str(os.cpu_count() or 4),
           "CUDA_HOME": os.environ.get("CUDA_HOME", "/usr/local/cuda")}
    status = _sh([sys.executable, "setup.py", "build_ext", "--inplace"], log, env=env)
    print(f"building spu_kernels._C for sm_{cc.replace('.', '')}: exit {status} "
          "(the cuda backend is skipped by the tests and suites if it did not build)", flush=True)
    return status == 0 and _extension_loads()


def gpu_tests(log: str, run_id: str, timeout: float | None, have_extension: bool) -> int:
    """The test suite on the GPU (``make test-gpu``), its counts written as rows of this run."""
    junit = os.path.join(LOG, "gpu-tests.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", f"--junitxml={junit}"]
    try:
        import xdist  # noqa: F401
        cmd += ["-n", "8"]        # Triton compiles in parallel; the GPU is shared by the workers
    except ImportError:
        pass
    if os.path.exists(junit):
        os.remove(junit)
    status = _sh(cmd, log, timeout=timeout, env={"SPU_EXPECT_CUDA_EXT": "1" if have_extension else "0"})
    if os.path.exists(junit):
        counts, failing = junit_counts(junit)
        note = ("timed out; " if status == 124 else "") + ", ".join(failing[:15]) + (" …" if len(failing) > 15 else "")
    else:
        counts, note = {"passed": 0.0, "failed": 0.0, "skipped": 0.0}, f"pytest exited {status} without a report"
    env_cols = schema.environment("cuda")
    rows = [dict(run_id=run_id, suite="gpu-tests", case="pytest tests", kind="all", config="make test-gpu",
                 dtype="all", metric=m, value=v, unit="count", note=note if m == "failed" else "", **env_cols)
            for m, v in counts.items()]
    schema.append_rows(os.path.join(schema.RESULTS_DIR, schema.csv_name(env_cols)), rows)
    return 0 if status == 0 and not counts["failed"] else 1


def junit_counts(path: str) -> tuple[dict[str, float], list[str]]:
    """({passed, failed, skipped}, failing test ids) of a pytest JUnit XML report (errors count as failed)."""
    counts = {"passed": 0.0, "failed": 0.0, "skipped": 0.0}
    root = ET.parse(path).getroot()
    for suite in root.iter("testsuite"):
        tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
        bad = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        counts["passed"] += tests - skipped - bad
        counts["failed"] += bad
        counts["skipped"] += skipped
    failing = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
               if case.find("failure") is not None or case.find("error") is not None]
    return counts, failing


def finish(log: str) -> None:
    """Regenerate RESULTS.md and the plots; copy what matters to $OUT (at most 8 files come back)."""
    report.main([])
    out = os.environ.get("OUT")
    if not out:
        return
    files = sorted(glob.glob(os.path.join(schema.RESULTS_DIR, "*.csv"))) + [report.MARKDOWN, log]
    files += sorted(glob.glob(os.path.join(report.PLOTS_DIR, "*.png")))[:8 - len(files)]
    for path in files:
        shutil.copy(path, out)
    print(f"copied to $OUT: {', '.join(os.path.basename(p) for p in files)}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", type=int, default=0, help="0: everything; 1: build + tests; 2, 3, ...: the suites")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="per part: start nothing new after this")
    args = ap.parse_args(argv)
    if args.part < 0:
        ap.error("--part must be 0 (everything) or 1, 2, ...")
    import torch
    if not torch.cuda.is_available():
        print("make gpu-report needs a CUDA GPU; without one, `python -m benchmarks.run --smoke` checks the "
              "suites and `python -m benchmarks.run host` measures the host cost", file=sys.stderr)
        return 2
    start = time.monotonic()
    os.makedirs(LOG, exist_ok=True)
    log = os.path.join(LOG, f"gpu-report-part{args.part}.log")
    open(log, "w").close()
    _sh([sys.executable, "-m", "spu_kernels.env"], log)
    status = 0
    if args.part in (0, 1):
        have_extension = build_extension(log)
        timeout = None if args.part == 0 else max(60.0, args.budget_s - (time.monotonic() - start))
        status = gpu_tests(log, schema.new_run_id(), timeout, have_extension)
        if status:
            print("gpu-report: tests FAILED on the GPU (see the log): fix these first", flush=True)
    if args.part != 1:
        budget = [] if args.part == 0 else ["--budget-s", str(max(1.0, args.budget_s - (time.monotonic() - start)))]
        code = run.main(ORDER + ["--resume"] + budget)
        if code == run.BUDGET_REACHED:
            print(f"gpu-report: part {args.part} used its budget; run part {args.part + 1} next", flush=True)
            status = status or run.BUDGET_REACHED
        elif code:
            status = 1
    finish(log)
    print(f"gpu-report part {args.part}: exit {status} after {time.monotonic() - start:.0f} s", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

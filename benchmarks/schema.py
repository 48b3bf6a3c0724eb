"""The one results schema: every benchmark row of every suite, one CSV per device under
benchmarks/results/, appended run after run (the report shows each device's newest run per suite).

A row is one metric of one kind in one case, with the facts of the machine and the code it was
measured on, so nobody has to retype a number or remember where it came from.
"""
from __future__ import annotations

import csv
import datetime
import functools
import hashlib
import os
import platform
import re
import subprocess
from typing import Iterable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")

# measurement columns, then environment columns (the same on every row of one run)
MEASUREMENT = ["run_id", "suite", "case", "kind", "config", "dtype", "metric", "value", "unit", "p20", "p80",
               "ratio", "reference", "target", "note"]
ENVIRONMENT = ["device", "gpu", "cuda", "driver", "torch", "triton", "transformers", "peft", "spu_kernels",
               "commit", "date"]
COLUMNS = MEASUREMENT + ENVIRONMENT
# columns no row may leave empty
REQUIRED = ["run_id", "suite", "case", "kind", "config", "dtype", "metric", "unit", "device", "gpu", "torch",
            "spu_kernels", "commit", "date"]

UNITS = {"time_ms": "ms", "peak_mib": "MiB", "peak_extra_mib": "MiB", "samples_per_s": "samples/s",
         "gbps": "GB/s", "hbm_share": "fraction", "launches": "count", "graph_breaks": "count", "host_us": "us",
         "optimizer_state_mib": "MiB",
         "passed": "count", "failed": "count", "skipped": "count"}


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "not installed"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_digest() -> str:
    """A digest of the package, kernel and benchmark sources: names the code where git cannot
    (a device machine's copy of the tree has no .git)."""
    h = hashlib.sha256()
    for top in ("spu_kernels", "csrc", "benchmarks"):
        for dirpath, dirnames, filenames in sorted(os.walk(os.path.join(ROOT, top))):
            dirnames[:] = sorted(d for d in dirnames if d not in ("results", "__pycache__", "plots"))
            for name in sorted(filenames):
                if name.endswith((".py", ".cu", ".cuh", ".cpp", ".h")):
                    path = os.path.join(dirpath, name)
                    h.update(os.path.relpath(path, ROOT).encode())
                    with open(path, "rb") as f:
                        h.update(f.read())
    return h.hexdigest()[:10]


@functools.lru_cache(maxsize=None)
def commit() -> str:
    """The git commit (``-dirty`` when sources differ from it), ``$SPU_BENCH_COMMIT`` where there is
    no git, and the source digest either way: e.g. ``0e0c219 src:3fa2...``."""
    head = _git("rev-parse", "--short", "HEAD")
    if head is not None:
        dirty = _git("status", "--porcelain", "--", "spu_kernels", "csrc", "benchmarks", "setup.py",
                     ":!benchmarks/results", ":!benchmarks/RESULTS.md", ":!benchmarks/plots")
        head += "-dirty" if dirty else ""
    else:
        head = os.environ.get("SPU_BENCH_COMMIT", "").strip() or "no-git"
    return f"{head} src:{source_digest()}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            if m:
                return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


@functools.lru_cache(maxsize=None)
def environment(device: str) -> dict[str, str]:
    """The environment columns for rows measured on ``device`` ("cuda" or "cpu")."""
    import torch
    if device == "cuda":
        gpu = torch.cuda.get_device_name()
        where = "cuda"
    else:
        gpu = f"none (CPU: {_cpu_name()}, {os.cpu_count()} cores)"
        where = "cpu"
    return {"device": where, "gpu": gpu, "cuda": torch.version.cuda or "none", "driver": _driver_version(),
            "torch": torch.__version__, "triton": _version("triton"), "transformers": _version("transformers"),
            "peft": _version("peft"), "spu_kernels": _version("spu_kernels"), "commit": commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def new_run_id() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def csv_name(env: dict[str, str]) -> str:
    """One CSV per device: ``nvidia-h100-80gb-hbm3.csv``, ``cpu.csv``."""
    if env["device"] != "cuda":
        return "cpu.csv"
    return re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-") + ".csv"


def read_rows(paths: Iterable[str]) -> list[dict[str, str]]:
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != COLUMNS:
                raise ValueError(f"{path}: columns {reader.fieldnames} are not the schema's {COLUMNS}; "
                                 "rewrite it with benchmarks/schema.py's COLUMNS (or move it out of the results "
                                 "folder)")
            rows.extend(reader)
    return rows


def append_rows(path: str, rows: list[dict]) -> None:
    """Append ``rows`` (every column present) to the CSV at ``path``, writing the header if new."""
    for row in rows:
        missing = [c for c in REQUIRED if row.get(c) in (None, "")]
        extra = set(row) - set(COLUMNS)
        if missing or extra:
            raise ValueError(f"benchmark row {row} breaks the schema: missing {missing}, unknown {sorted(extra)}")
    new = not os.path.exists(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({c: _fmt(row.get(c, "")) for c in COLUMNS})


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.6g}"
    return "" if v is None else str(v)

"""How spu_kernels._C is compiled: shared by setup.py (ahead of time) and _extension.py (the JIT
fallback), so that both build the same thing. Imports nothing heavy at module level: setup.py loads
this file on its own, before deciding whether torch is even there.

Environment:
  SPU_CUDA_ARCHS   compute capabilities, ';' or ',' separated, "+PTX" on one to embed PTX
                   (default "8.0;9.0+PTX")
  NVCC_THREADS     nvcc --threads (parallel compilation of the architectures; default 1)
  MAX_JOBS         parallel compile jobs (read by torch's BuildExtension / ninja)
  CUDA_HOME        the CUDA toolkit (default: /usr/local/cuda when it has bin/nvcc)
"""
from __future__ import annotations

import os
import re
import shutil

DEFAULT_ARCHS = "8.0;9.0+PTX"
# The files of the extension, relative to csrc/: kernels (.cu, no torch headers), their op
# registrations (.cpp, torch headers) and the Python module.
SOURCES = ("module.cpp", "lowrank_linear.cpp", "lowrank_kernels.cu")
HEADERS = ("philox.cuh", "lowrank_kernels.h")


def default_cuda_home() -> str | None:
    """CUDA_HOME if set, else /usr/local/cuda when it holds nvcc, else the directory of nvcc on PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def ensure_cuda_home() -> str | None:
    """Set CUDA_HOME before torch.utils.cpp_extension is imported (it reads it once, and without
    it may guess a directory whose lib64 has no libcudart)."""
    home = default_cuda_home()
    if home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = home
    return home


def parse_archs(spec: str | None = None) -> list[tuple[str, bool]]:
    """[("90", ptx?), ...] from "8.0;9.0+PTX" (also "80,90", "9.0a"). Raises on a malformed entry."""
    spec = (spec if spec is not None else os.environ.get("SPU_CUDA_ARCHS", DEFAULT_ARCHS)).strip()
    out = []
    for item in filter(None, (s.strip() for s in re.split(r"[;, ]+", spec))):
        m = re.fullmatch(r"(\d+)\.?(\d)([af]?)(\+PTX)?", item, re.I)
        if not m:
            raise ValueError(f"SPU_CUDA_ARCHS: cannot read {item!r}; write compute capabilities like "
                             f"'8.0;9.0+PTX' (got {spec!r})")
        out.append((m.group(1) + m.group(2) + m.group(3).lower(), bool(m.group(4))))
    if not out:
        raise ValueError("SPU_CUDA_ARCHS is empty; name at least one compute capability, e.g. 9.0")
    return out


def gencode_flags(archs: list[tuple[str, bool]]) -> list[str]:
    flags = []
    for cc, ptx in archs:
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    return flags


def arch_label(archs: list[tuple[str, bool]]) -> str:
    """e.g. "sm80_sm90+PTX": a token the C++ preprocessor can turn into a string."""
    return "_".join(f"sm{cc}" + ("+PTX" if ptx else "") for cc, ptx in archs)


def compile_args(torch_version: str, cuda_version: str, archs: list[tuple[str, bool]] | None = None) -> dict:
    """extra_compile_args for CUDAExtension / cpp_extension.load: {"cxx": [...], "nvcc": [...]}."""
    archs = archs if archs is not None else parse_archs()
    info = f"cuda{cuda_version}_torch{torch_version.split('+')[0]}"
    defines = [f"-DSPU_CUDA_ARCHS_TOKEN={arch_label(archs)}", f"-DSPU_BUILD_INFO_TOKEN={info}"]
    threads = os.environ.get("NVCC_THREADS", "1")
    return {
        "cxx": ["-O3", "-std=c++20", *defines],
        "nvcc": ["-O3", "-std=c++20", "-lineinfo", f"--threads={threads}", *defines,
                 *gencode_flags(archs)],
    }


def local_version(torch_version: str, cuda_version: str | None) -> str:
    """The wheel's local version tag: SPU_LOCAL_VERSION if set (may be empty), else e.g. "cu130torch2.14"."""
    if "SPU_LOCAL_VERSION" in os.environ:
        return os.environ["SPU_LOCAL_VERSION"].strip()
    if not cuda_version:
        return ""
    major_minor = ".".join(torch_version.split("+")[0].split(".")[:2])
    return f"cu{cuda_version.replace('.', '')}torch{major_minor}"

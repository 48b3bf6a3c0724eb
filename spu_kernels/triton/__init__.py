"""Triton kernels and their launchers only. Nothing here knows about modules or models; the ops in
spu_kernels/ops import these lazily, on first use. Set TRITON_INTERPRET=1 before importing
spu_kernels to run them on the CPU (tests do)."""

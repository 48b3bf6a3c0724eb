"""The package version, in one low-level place: spu_kernels/__init__.py and patching/checkpoint.py
import it from here (nothing below the package root imports the root)."""
__version__ = "0.1.0"

"""Each op's forward and backward as torch custom ops, one pair per backend, and the eager
autograd.Function over the same implementations: the one place where an op meets torch.library.

For op NAME and backend BE (torch | triton | cuda):
  * ``spu_kernels::NAME_fwd_BE`` and ``spu_kernels::NAME_bwd_BE``. The triton backend's ops are
    ``torch.library.triton_op`` (kernels launched through ``wrap_triton``, so Inductor sees them and
    schedules around them) on a GPU, and ``torch.library.custom_op`` under TRITON_INTERPRET=1,
    whose kernels cannot be traced with fake tensors. The torch and cuda backends' ops are
    ``custom_op``s (opaque to the compiler). Every custom_op has a fake implementation (shapes
    and dtypes only); a triton_op's own body is its fake.
  * Autograd is registered on the forward op with ``register_autograd``; its backward calls the
    backward op of the same backend.
  * Outputs after the first are auxiliaries kept for backward (the low-rank op's u, the ladder's
    log-sum-exp): never differentiated.

Which path a call takes (``OpPair.__call__``): under ``torch.compile`` the custom op; in eager an
autograd.Function that calls the very same forward / backward implementations and the same
``setup_context`` / ``backward``. The dispatcher's custom-op path costs ~30-40 µs more host time per
forward+backward than an autograd.Function (CPU, torch 2.14), which the launch-bound models this
package trains cannot afford in eager mode; compiled, that cost is paid once at trace time, and the
compiler needs the op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..backends import triton_interpret

NAMESPACE = "spu_kernels"


def _define(qualname: str, schema: str, impl: Callable, fake: Callable, triton: bool):
    if triton and not triton_interpret():
        def body(*args):
            from ..triton._launcher import in_triton_op  # its launchers go through wrap_triton
            with in_triton_op():
                return impl(*args)
        return torch.library.triton_op(qualname, body, mutates_args=(), schema=schema)
    op = torch.library.custom_op(qualname, impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


def _bound(fn: Callable, backend: str) -> Callable:
    def impl(*args):
        return fn(backend, *args)
    return impl


@dataclass
class OpPair:
    """An op's custom ops (``fwd[backend]``, ``bwd[backend]``: OpOverloads) and its eager Function."""
    name: str
    fwd: dict
    bwd: dict
    function: type

    def __call__(self, backend: str, *args):
        """The forward op of ``backend`` on ``args`` (already validated and cast), with autograd."""
        if torch.compiler.is_compiling():
            return self.fwd[backend](*args)
        return self.function.apply(*args, backend)


def define_op_pair(name: str, backends: tuple[str, ...], *, fwd: Callable, bwd: Callable,
                   fwd_schema: str, bwd_schema: str, fwd_fake: Callable, bwd_fake: Callable,
                   setup_context: Callable, backward: Callable) -> OpPair:
    """Define NAME_fwd_BE / NAME_bwd_BE for every backend and the eager Function.

    ``fwd(backend, *inputs)`` and ``bwd(backend, *args)`` are the implementations (``bwd`` returns
    a tensor per grad it can make, an empty one for a grad not asked for); ``setup_context(ctx,
    inputs, output)`` saves what backward needs; ``backward(ctx, bwd_call, grad_output)`` returns
    one grad (or None) per input, calling ``bwd_call(*args)`` for the backward op.
    """
    fwd_ops, bwd_ops = {}, {}
    for be in backends:
        triton = be == "triton"
        f = _define(f"{NAMESPACE}::{name}_fwd_{be}", fwd_schema, _bound(fwd, be), fwd_fake, triton)
        _define(f"{NAMESPACE}::{name}_bwd_{be}", bwd_schema, _bound(bwd, be), bwd_fake, triton)
        bwd_overload = getattr(getattr(torch.ops, NAMESPACE), f"{name}_bwd_{be}").default

        def op_backward(ctx, *grads, _bwd=bwd_overload):
            return backward(ctx, _bwd, grads[0])
        f.register_autograd(op_backward, setup_context=setup_context)
        fwd_ops[be] = getattr(getattr(torch.ops, NAMESPACE), f"{name}_fwd_{be}").default
        bwd_ops[be] = bwd_overload

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            *inputs, backend = args
            out = fwd(backend, *inputs)
            setup_context(ctx, tuple(inputs), out)
            ctx.backend = backend
            if isinstance(out, tuple):
                ctx.mark_non_differentiable(*out[1:])
                ctx.set_materialize_grads(False)   # no zero-filled grad (a memset) for the auxiliaries
            return out

        @staticmethod
        def backward(ctx, *grads):
            backend = ctx.backend
            return (*backward(ctx, lambda *a: bwd(backend, *a), grads[0]), None)

    Function.__name__ = Function.__qualname__ = "".join(w.title() for w in name.split("_")) + "Function"
    return OpPair(name, fwd_ops, bwd_ops, Function)


def define_inplace_ops(name: str, backends: tuple[str, ...], schema: str, impl: Callable,
                       mutates: tuple[str, ...]) -> dict:
    """``spu_kernels::NAME_BE`` per backend for an op that updates its inputs in place and returns
    nothing (no autograd: it runs under no_grad): an opaque custom_op whose fake does nothing. Its
    Triton launches use a table of raw pointers, which fake tensors do not have, so the triton
    backend's op is a custom_op too. ``impl(backend, *args)`` is the implementation."""
    ops = {}
    for be in backends:
        op = torch.library.custom_op(f"{NAMESPACE}::{name}_{be}", _bound(impl, be), mutates_args=mutates,
                                     schema=schema)
        op.register_fake(lambda *args: None)
        ops[be] = getattr(getattr(torch.ops, NAMESPACE), f"{name}_{be}").default
    return ops


def no_grad_placeholder(like: torch.Tensor) -> torch.Tensor:
    """What a backward op returns for a grad that was not asked for (its schema returns Tensors)."""
    return like.new_empty((0,))


def grads_or_placeholders(grads, dtypes, like: torch.Tensor) -> tuple:
    """A backward op's outputs: each grad in its dtype (that of what it is for), a placeholder for
    each grad not asked for (None)."""
    return tuple(t.to(dt) if t is not None else no_grad_placeholder(like) for t, dt in zip(grads, dtypes))

"""Kernels launched by one forward+backward of each op on the triton backend (bf16 tokens, fp32
master adapters, as patch() sets them up), counted on the CPU (tests/launch_count.py): Triton
launches plus the ATen ops that would launch a kernel on a GPU (memsets, casts, elementwise).
On the launch-bound models this package trains each launch costs ~2-5 µs of host time, so the
counts are part of the contract: the table is the documentation (README "Launches per step"), and
a change that adds a launch must say so here."""
import pytest
import torch
from helpers import LOWRANK_BACKENDS
from launch_count import count_launches

import spu_kernels

pytestmark = pytest.mark.skipif("triton" not in LOWRANK_BACKENDS, reason="needs the triton backend")
BF = torch.bfloat16
T, K, N, R = 40, 48, 40, 4

# op call -> (kernels per forward+backward, what they are)
LAUNCHES = {
    "lowrank_linear": (5, "down, GEMM+epilogue | dy pass, the sum of v's partials over dy's two column blocks, "
                          "dx GEMM + epilogue + grad_A (no memset, no atomics)"),
    "lowrank_linear dropout": (6, "the same + the seed drawn on the device"),
    "ia3_linear output": (4, "GEMM⊙l | dx GEMM, one pass over dy and y for grad_l, the sum of its token "
                             "splits' partials"),
    "ia3_linear input": (3, "GEMM with x⊙l | dx GEMM with grad_l's row-block partials, their sum"),
    "ia3_scaled_act": (3, "act⊙l | one pass for dh and grad_l, the sum of its token splits' partials"),
    "ia3_dynamic_linear": (6, "GEMM with x Dᵀ in its K loop, ⊙(1 + tanh) in its epilogue | one pass over dy and y "
                              "(dz, dg's column-split shares, grad_U's row-block partials), the two ordered sums, "
                              "dx GEMM (+ dg D), grad_D GEMM (5 with one column split)"),
    "kron_linear": (6, "GEMM, Kronecker term | dx GEMM, its term, grad_A and grad_B in one kernel, the sum of its "
                       "token splits' partials (GEMMs past TRITON_GEMM_MAX_MACS: cuBLAS, same count)"),
    "bottleneck_adapter": (8, "down, act, up and residual in one kernel | dz and dh in one kernel, grad_W_d and "
                              "grad_W_u GEMMs and their casts to the fp32 weights, the two bias sums"),
    "ladder_cross_attention": (4, "fused attention | fused backward (head groups write fp32 parts of dC), their "
                                  "ordered sum in the activations' dtype, dW (3 with one head group)"),
}


def _x(*shape, dtype=BF):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def _call(name):
    """(op, args, kwargs) of the call ``name``, inputs made here (outside the count)."""
    f32 = torch.float32
    w = torch.randn(N, K, dtype=BF)
    lowrank = (spu_kernels.lowrank_linear, (_x(T, K), w, None, _x(R, K, dtype=f32), _x(N, R, dtype=f32)))
    return {
        "lowrank_linear": lowrank + ({},),
        "lowrank_linear dropout": lowrank + ({"dropout_p": 0.1},),
        "ia3_linear output": (spu_kernels.ia3_linear, (_x(T, K), w, None, _x(N, dtype=f32)), {}),
        "ia3_linear input": (spu_kernels.ia3_linear, (_x(T, K), w, None, _x(K, dtype=f32)), {"side": "input"}),
        "ia3_scaled_act": (spu_kernels.ia3_scaled_act, (_x(T, 37), _x(37, dtype=f32)), {}),
        "ia3_dynamic_linear": (spu_kernels.ia3_dynamic_linear,
                               (_x(T, K), w, None, _x(R, K, dtype=f32), _x(N, R, dtype=f32)), {}),
        "kron_linear": (spu_kernels.kron_linear, (_x(T, K), w, None, _x(5, 6, dtype=f32), _x(8, 8, dtype=f32)), {}),
        "bottleneck_adapter": (spu_kernels.bottleneck_adapter, (_x(T, N), _x(R, N, dtype=f32), _x(R, dtype=f32),
                                                                _x(N, R, dtype=f32), _x(N, dtype=f32)), {}),
        "ladder_cross_attention": (spu_kernels.ladder_cross_attention,
                                   (_x(T, 4, 8), _x(3, T, 32), _x(32, 32, dtype=f32), _x(32, 32, dtype=f32)), {}),
    }[name]


@pytest.mark.parametrize("name", list(LAUNCHES))
def test_kernels_per_forward_backward(name):
    op, args, kwargs = _call(name)
    with spu_kernels.use_backend("triton"):
        with torch.no_grad():
            dy = torch.randn_like(op(*args, **kwargs))    # warm-up (autotuning) and the output grad
        with count_launches() as kernels:
            op(*args, **kwargs).backward(dy)
    want, what = LAUNCHES[name]
    assert sum(kernels.values()) == want, f"{name}: {dict(kernels)} is not the documented {want} ({what})"

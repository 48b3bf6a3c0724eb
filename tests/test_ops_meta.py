"""Every op infers shapes on meta tensors (no data, no kernels): forward, and backward gives each
input's grad its shape, on the torch backend every meta call resolves to."""
import pytest
import torch

import spu_kernels


def _m(*shape, grad=False):
    return torch.empty(*shape, device="meta").requires_grad_(grad)


CASES = {
    "lowrank_linear": lambda x: spu_kernels.lowrank_linear(x, _m(6, 8), _m(6, grad=True), _m(2, 8, grad=True),
                                                           _m(6, 2, grad=True), rank_scale=_m(2, grad=True)),
    "ia3_linear output": lambda x: spu_kernels.ia3_linear(x, _m(6, 8), _m(6, grad=True), _m(6, grad=True)),
    "ia3_linear input": lambda x: spu_kernels.ia3_linear(x, _m(6, 8), None, _m(8, grad=True), side="input"),
    "kron_linear": lambda x: spu_kernels.kron_linear(x, _m(6, 8), None, _m(2, 2, grad=True), _m(3, 4, grad=True)),
    "ia3_scaled_act": lambda x: spu_kernels.ia3_scaled_act(x, _m(8, grad=True)),
    "bottleneck_adapter": lambda x: spu_kernels.bottleneck_adapter(x, _m(3, 8, grad=True), _m(3, grad=True),
                                                                   _m(8, 3, grad=True), _m(8, grad=True), "gelu"),
    "ia3_dynamic_linear": lambda x: spu_kernels.ia3_dynamic_linear(x, _m(6, 8), _m(6, grad=True), _m(2, 8, grad=True),
                                                                   _m(6, 2, grad=True)),
}


@pytest.mark.parametrize("op", list(CASES))
def test_ops_infer_shapes_on_meta_tensors(op):
    x = _m(3, 4, 8, grad=True)
    y = CASES[op](x)
    same = op in ("ia3_scaled_act", "bottleneck_adapter")
    assert y.device.type == "meta" and y.shape == ((3, 4, 8) if same else (3, 4, 6))
    y.sum().backward()
    assert x.grad.shape == x.shape and x.grad.device.type == "meta"


def test_ladder_cross_attention_infers_shapes_on_meta_tensors():
    q, c = _m(5, 2, 4, grad=True), _m(3, 5, 8, grad=True)
    wk, wv = _m(8, 8, grad=True), _m(8, 8, grad=True)
    o = spu_kernels.ladder_cross_attention(q, c, wk, wv)
    assert o.shape == q.shape and o.device.type == "meta"
    o.sum().backward()
    assert [t.grad.shape for t in (q, c, wk, wv)] == [q.shape, c.shape, wk.shape, wv.shape]

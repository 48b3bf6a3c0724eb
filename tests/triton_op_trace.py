"""The triton backend's custom ops (``torch.library.triton_op``, spu_kernels/ops/_library.py) under
torch.compile, without a GPU: what the Triton interpreter cannot show.

Under TRITON_INTERPRET=1 the triton backend's ops are opaque custom ops, because the interpreter's
kernels cannot be traced with fake tensors. On a GPU they are triton_ops whose bodies torch.compile
traces (fake tensors, symbolic sizes, each launch recorded through wrap_triton). This script runs
that GPU code path on CPU tensors with Triton's stand-in driver (spu_kernels/triton/stub_driver.py:
kernels compile for sm_90, launches are counted no-ops, so outputs are garbage and unchecked): a
patched model per method, compiled with ``fullgraph=True`` (dynamo + AOTAutograd, "aot_eager"), runs
forward and backward, and its traced graphs must contain the kernel launches.

    python tests/triton_op_trace.py        # one line per model; exit 1 on the first failure
"""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)     # the GPU code path, not the interpreter
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from spu_kernels.triton.stub_driver import install_stub_launches  # noqa: E402

CASES = [("lora", "llama", {"r": 4, "dropout": 0.1}), ("siva", "roberta", {"r": 4}), ("ia3", "bert", {}),
         ("krona", "gpt2", {}), ("klst", "roberta", {"k": 3, "r": 4}), ("siva_kv", "t5", {"r": 4}),
         ("ia3", "llama", {"dynamic": True}), ("adapter", "distilbert", {"r": 8})]


def main() -> int:
    stub = install_stub_launches(90)
    from models import make_batch, make_model
    from torch._dynamo.testing import CompileCounterWithBackend

    import spu_kernels

    def loss(model, batch):
        return model(**batch).logits.float().square().mean()

    for method, family, opts in CASES:
        torch._dynamo.reset()
        model = make_model(family, torch.bfloat16).train()
        spu_kernels.patch(model, method, **opts)
        backend = CompileCounterWithBackend("aot_eager")
        before = stub.launches
        try:
            with spu_kernels.use_backend("triton"):
                torch.compile(loss, backend=backend, fullgraph=True)(model, make_batch(family)).backward()
        except Exception as e:  # noqa: BLE001 - report which model failed and why
            print(f"FAIL {method} on {family}: {type(e).__name__}: {str(e)[:2000]}")
            return 1
        ops = {str(n.target) for g in backend.graphs for n in g.graph.nodes if n.op == "call_function"}
        ours = sorted(o for o in ops if "spu_kernels" in o)
        launches = stub.launches - before
        if not ours or launches == 0:
            print(f"FAIL {method} on {family}: no spu_kernels op in the graph ({ours}) or no launch ({launches})")
            return 1
        print(f"traced {method} on {family}: {backend.frame_count} graph, ops {ours}, {launches} launches")
    return 0


if __name__ == "__main__":
    sys.exit(main())

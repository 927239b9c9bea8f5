"""GFLOPs per frame counted on an ONNX graph, for artifacts whose model card does not carry them."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def graph_gflops(path: str | Path) -> float | None:
    """GFLOPs per frame counted on the ONNX graph; None on the core install, which has
    onnxruntime but not onnx (a card without GFLOPs then reports none rather than failing)."""
    try:
        return count_onnx_flops(path) / 1e9
    except ModuleNotFoundError:
        return None


def count_onnx_flops(path: str | Path, batch: int = 1) -> int:
    """FLOPs (2 x multiply-adds) of one forward pass of an ONNX graph at ``batch``, counted over
    Conv, ConvTranspose, MatMul and Gemm - the ops torch.utils.flop_counter counts for these
    models - with shapes from ONNX shape inference (the batch axis fixed to ``batch``)."""
    import onnx
    from onnx import shape_inference

    model = onnx.load_model(str(path), load_external_data=False)
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_value = batch
    model = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    shapes: dict[str, list[int]] = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.dim_value else -1 for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)

    def attr(node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    total = 0
    for node in model.graph.node:
        op = node.op_type
        if op in ("Conv", "ConvTranspose"):
            w = shapes.get(node.input[1])
            out = shapes.get(node.output[0])
            x = shapes.get(node.input[0])
            if not w or not out or min(out) < 0 or not x or min(x) < 0:
                continue
            kernel = int(np.prod(w[2:]))
            if op == "Conv":  # w: (Cout, Cin/groups, k...)
                total += 2 * int(np.prod(out)) * w[1] * kernel
            else:  # w: (Cin, Cout/groups, k...): every input pixel scatters into Cout/groups * k outputs
                total += 2 * int(np.prod(x)) * w[1] * kernel
        elif op in ("MatMul", "Gemm"):
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            out = shapes.get(node.output[0])
            if not a or not b or not out or min(out) < 0 or min(a) < 0:
                continue
            if op == "Gemm":
                k = a[0] if attr(node, "transA", 0) else a[-1]
            else:
                k = a[-1]
            total += 2 * int(np.prod(out)) * int(k)
    return total



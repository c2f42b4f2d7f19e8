"""A tiny ONNX model builder shared by the sparsity tests (float32 graphs, opset 17 + gie)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from engine.ops.registry import GIE_DOMAIN


def graph_model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, tuple[int, ...]],
    consts: dict[str, np.ndarray],
    outputs: list[str],
) -> onnx.ModelProto:
    """A model of ``nodes`` with float32 ``inputs`` (name -> shape), ``consts`` as
    initializers and ``outputs`` of unknown shape."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(a, n) for n, a in consts.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(GIE_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets)

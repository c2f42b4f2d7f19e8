"""Every op's shape/dtype rule agrees with the real outputs of the ONNX conformance cases."""

from __future__ import annotations

import numpy as np
import pytest

from engine.conformance import iter_cases
from engine.onnx_io import ModelLoadError, load
from engine.ops.registry import TensorSpec, default_registry, dtype_of_array, normalize_domain
from engine.ops.shape_inference import infer_node


def _spec_of(value: object) -> TensorSpec | None:
    if isinstance(value, np.ndarray):
        return TensorSpec(tuple(value.shape), dtype_of_array(value), value)
    return TensorSpec(None, None)


@pytest.mark.slow
def test_shape_rules_match_conformance_outputs() -> None:
    registry = default_registry()
    mismatches: list[str] = []
    checked_ops: set[str] = set()
    for case in iter_cases(["node"]):
        if len(case.model.graph.node) != 1 or not case.data_sets:
            continue
        try:
            model = load(case.model, infer_shapes=False)
        except ModelLoadError:
            continue
        nodes = list(model.graph)
        if len(nodes) != 1 or registry.lookup(nodes[0].op_type, nodes[0].domain) is None:
            continue
        node = nodes[0]
        inputs, expected = case.data_sets[0]
        feeds = dict(zip([v.name for v in model.graph.inputs], inputs))
        specs = []
        for value in node.inputs:
            if value is None:
                specs.append(None)
            elif value.const_value is not None:
                array = value.const_value.numpy()
                specs.append(TensorSpec(tuple(array.shape), dtype_of_array(array), array))
            else:
                specs.append(_spec_of(feeds.get(value.name)))
        opset = model.opset_imports.get(normalize_domain(node.domain), 1)
        try:
            outputs = infer_node(node, specs, opset, registry)
        except Exception as error:  # noqa: BLE001 - collected and reported
            mismatches.append(f"{case.name}: rule raised {type(error).__name__}: {error}")
            continue
        checked_ops.add(node.op_type)
        names = [v.name for v in model.graph.outputs]
        for value, spec in zip(node.outputs, outputs):
            if value.name not in names or not isinstance(spec, TensorSpec):
                continue
            actual = expected[names.index(value.name)]
            if not isinstance(actual, np.ndarray):
                continue
            if spec.is_static and tuple(spec.shape) != actual.shape:
                mismatches.append(f"{case.name}: shape {spec.shape} != {actual.shape}")
            if spec.dtype is not None and spec.dtype != dtype_of_array(actual):
                mismatches.append(f"{case.name}: dtype {spec.dtype} != {actual.dtype}")
    assert len(checked_ops) > 100
    assert not mismatches, f"{len(mismatches)} rule mismatches:\n" + "\n".join(mismatches[:60])

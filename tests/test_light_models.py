"""The nine classic "light" networks in the onnx wheel match their expected outputs and
onnxruntime at rtol 1e-4 -- including the input of the last node (the logits before Softmax),
which, unlike the near-uniform softmax of these constant-weight models, carries the whole
network's arithmetic."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from engine.backends.numpy_ref import ReferenceInterpreter
from engine.examples import (
    LIGHT_MODELS,
    light_expected_output_path,
    light_model_inputs,
    light_model_path,
)
from engine.onnx_io import load

RTOL = 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_model_matches_expected_output_and_onnxruntime(name: str) -> None:
    proto = onnx.load(light_model_path(name))
    ((input_name, x),) = light_model_inputs(proto).items()
    logits_name = proto.graph.node[-1].input[0]  # the Softmax's input (a Reshape's in DenseNet)

    captured: dict[str, np.ndarray] = {}

    def tap(node, outputs) -> None:
        for value, result in zip(node.outputs, outputs):
            if value.name == logits_name:
                captured["logits"] = result

    outputs = ReferenceInterpreter(load(proto)).run({input_name: x}, tap=tap).outputs
    ours = outputs[proto.graph.output[0].name]
    expected = numpy_helper.to_array(onnx.load_tensor(str(light_expected_output_path(name))))
    np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=1e-7)

    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(logits_name))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    theirs, their_logits = session.run(None, {input_name: x})
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=1e-7)
    assert np.ptp(their_logits) > 0 or np.abs(their_logits).max() > 0
    np.testing.assert_allclose(captured["logits"], their_logits, rtol=RTOL, atol=1e-5)

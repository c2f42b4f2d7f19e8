"""The optimizer issue's acceptance: ResNet-50 at O2, BERT at O3, every zoo model, replay."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from engine.backends.numpy_ref import ReferenceInterpreter
from engine.examples import light_model_inputs, light_model_path
from engine.onnx_io import load
from engine.passes import Step, optimize, replay
from engine.passes.graph_text import canonical_text
from engine.passes.provenance import provenance
from engine.zoo import ZOO, build, make_inputs

RTOL, ATOL = 1e-4, 1e-5


def _ops(model) -> Counter[str]:
    return Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph)


def _outputs(model, feeds) -> list[np.ndarray]:
    return list(ReferenceInterpreter(model).run(feeds).outputs.values())


def _assert_same_outputs(original, optimized, feeds) -> None:
    for want, got in zip(_outputs(original, feeds), _outputs(optimized, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_light_resnet50_at_o2_is_53_conv_act_with_provenance() -> None:
    proto = onnx.load(light_model_path("resnet50"))
    # Also expose the pre-softmax logits: the softmax of these constant-weight nets is uniform.
    logits = proto.graph.node[-1].input[0]
    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(logits))
    original = load(proto)
    result = optimize(original, "O2")
    ops = _ops(result.model)
    assert ops["BatchNormalization"] == 0
    assert ops["gie::ConvAct"] == 53 and ops["Conv"] == 0
    _assert_same_outputs(original, result.model, light_model_inputs(proto))
    original_ops = {n.name: n.op_type for n in original.graph}
    for node in result.model.graph:
        if node.op_type != "ConvAct":
            continue
        kinds = {original_ops[name] for name in provenance(node)}
        assert {"Conv", "BatchNormalization"} <= kinds, (node.name, provenance(node))
        assert kinds <= {"Conv", "BatchNormalization", "Relu", "Sum", "Add"}


@pytest.mark.parametrize("name", ["bert_opset13", "bert_opset17"])
def test_bert_at_o3_fuses_layernorm_gelu_attention_and_folds_reshape_chains(name: str) -> None:
    proto = build(name)
    original = load(proto)
    result = optimize(original, "O3")
    ops = _ops(result.model)
    assert ops["gie::LayerNorm"] == 5, ops
    assert ops["gie::Gelu"] == 2 and ops["gie::Attention"] == 2, ops
    # (A Shape may stay where an Expand needs the symbolic [batch, sequence] of the input ids.)
    for leftover in ("ReduceMean", "Erf", "Softmax", "LayerNormalization"):
        assert ops[leftover] == 0, (leftover, ops)
    for node in result.model.graph:
        if node.op_type == "Reshape":
            assert node.inputs[1].const_value is not None, f"{node.name} reads a computed shape"
    _assert_same_outputs(original, result.model, make_inputs(proto, 0))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_keeps_its_outputs_at_o3(name: str) -> None:
    proto = build(name)
    original = load(proto)
    result = optimize(original, "O3")
    assert len(result.model.graph) < len(original.graph)
    _assert_same_outputs(original, result.model, make_inputs(proto, 0))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_gie_optimize_prints_a_timeline_and_its_json_replays(name: str, tmp_path: Path) -> None:
    model_path = tmp_path / f"{name}.onnx"
    onnx.save(build(name), model_path)
    json_path = tmp_path / "steps.json"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "optimize",
            str(model_path),
            "-O3",
            "--json",
            str(json_path),
            "-o",
            str(tmp_path / "out.onnx"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    document = json.loads(json_path.read_text())
    assert document["steps"], "no step recorded"
    lines = [line for line in completed.stdout.splitlines() if line.startswith("#")]
    assert len(lines) == len(document["steps"])
    assert any(key.startswith("gie::") for key in document["op_counts"])
    steps = [Step.from_json(step) for step in document["steps"]]
    replayed = replay(load(model_path), steps, "O3")
    # Both through the same save/load, which lifts any Constant node to an initializer.
    replayed_reloaded = load(ir.to_proto(replayed))
    assert canonical_text(replayed_reloaded) == canonical_text(load(tmp_path / "out.onnx"))

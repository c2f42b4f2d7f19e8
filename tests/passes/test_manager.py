"""The optimizer core: pass manager, instruments, steps, provenance, why-not, replay, verifier."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._rewrite_rule import RewriteRuleClassBase

from engine.onnx_io import load
from engine.passes import Instrument, PassFailedError, PassManager, Step, StepRecorder
from engine.passes.events import PassContext
from engine.passes.function_pass import FunctionPass
from engine.passes.graph_text import canonical_text
from engine.passes.pipelines import prepare_for_optimization
from engine.passes.provenance import provenance
from engine.passes.rewrite import RewritePass
from engine.passes.verifier import GraphVerificationError, verify_graph


class _DoubleNeg(RewriteRuleClassBase):
    """Neg(Neg(x)) -> Identity(x), refused when x is a graph input."""

    def pattern(self, op, x):
        return op.Neg(op.Neg(x))

    def check(self, context, x):
        if x.is_graph_input():
            return MatchResult().fail(f"{x.name} is a graph input")
        return MatchResult()

    def rewrite(self, op, x):
        return op.Identity(x)


class _ReluOfIdentity(RewriteRuleClassBase):
    """Relu(Identity(x)) -> Relu(x)."""

    def pattern(self, op, x):
        return op.Relu(op.Identity(x))

    def rewrite(self, op, x):
        return op.Relu(x)


DOUBLE_NEG = RewritePass("negations", (_DoubleNeg.rule(name="double_neg"),))
RELU_IDENTITY = RewritePass("relus", (_ReluOfIdentity.rule(name="relu_of_identity"),))


def _model(direct_input: bool = False) -> ir.Model:
    """[Abs ->] Neg -> Neg -> Relu; without the Abs the double_neg check refuses."""
    nodes = [
        helper.make_node("Abs", ["x"], ["x_abs"], name="abs"),
        helper.make_node("Neg", ["x_abs"], ["a"], name="neg_1"),
        helper.make_node("Neg", ["a"], ["b"], name="neg_2"),
        helper.make_node("Relu", ["b"], ["y"], name="relu"),
    ]
    if direct_input:
        nodes = nodes[1:]
        nodes[0].input[0] = "x"
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])], outputs
    )
    return load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


class _Log(Instrument):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def before_pass(self, pass_name, model) -> None:
        self.calls.append(f"before {pass_name}")

    def after_pass(self, pass_name, model, changed, seconds) -> None:
        self.calls.append(f"after {pass_name} changed={changed}")

    def after_rewrite(self, event, model) -> None:
        self.calls.append(f"rewrite {event.rule}")


def test_steps_record_removed_added_and_transitive_provenance() -> None:
    model = prepare_for_optimization(_model())
    recorder = StepRecorder(check_feeds={"x": np.array([-1, 2, -3, 4], np.float32)})
    log = _Log()
    PassManager([DOUBLE_NEG, RELU_IDENTITY], [recorder, log]).run(model)
    first, second = recorder.steps
    assert (first.rule, first.removed, first.anchor) == ("double_neg", ("neg_1", "neg_2"), "neg_2")
    assert first.rule_source.endswith(
        f"test_manager.py:{_DoubleNeg.rewrite.__code__.co_firstlineno}"
    )
    assert second.rule == "relu_of_identity"
    (relu_name,) = second.added
    assert set(second.provenance[relu_name]) == {"relu", "neg_1", "neg_2"}
    assert second.after.node_count == 2 and first.before.node_count == 4
    assert first.numeric_check is not None and first.numeric_check.max_abs == 0.0
    assert log.calls == [
        "before negations",
        "rewrite double_neg",
        "after negations changed=True",
        "before relus",
        "rewrite relu_of_identity",
        "after relus changed=True",
    ]
    relu = next(n for n in model.graph if n.op_type == "Relu")
    assert tuple(provenance(relu)) == second.provenance[relu_name]


def test_step_json_round_trips_and_refuses_other_schema_versions() -> None:
    model = prepare_for_optimization(_model())
    recorder = StepRecorder()
    PassManager([DOUBLE_NEG], [recorder]).run(model)
    data = json.loads(json.dumps(recorder.steps[0].to_json()))
    assert Step.from_json(data) == recorder.steps[0]
    data["schema_version"] = 99
    with pytest.raises(ValueError, match="schema version 99"):
        Step.from_json(data)


def test_why_not_is_recorded_on_the_node_when_the_check_refuses() -> None:
    model = prepare_for_optimization(_model(direct_input=True))
    recorder = StepRecorder()
    PassManager([DOUBLE_NEG], [recorder]).run(model)
    assert recorder.steps == []
    (why,) = recorder.why_not.values()
    assert (why.rule, why.node, why.reason) == ("double_neg", "neg_2", "x is a graph input")
    node = next(n for n in model.graph if n.name == "neg_2")
    assert json.loads(node.metadata_props["gie.why_not"])[0]["reason"] == "x is a graph input"


def test_disabled_rules_and_passes_do_not_run() -> None:
    for disabled in ({"double_neg"}, {"negations"}):
        model = prepare_for_optimization(_model())
        recorder = StepRecorder()
        PassManager([DOUBLE_NEG], [recorder], disabled=frozenset(disabled)).run(model)
        assert recorder.steps == [] and len(list(model.graph)) == 4


def test_a_failing_pass_is_named_with_the_passes_before_it() -> None:
    def explode(model: ir.Model, context: PassContext) -> bool:
        raise RuntimeError("boom")

    def duplicate_names(model: ir.Model, context: PassContext) -> bool:
        for node in model.graph:
            node.name = "same"
        return True

    model = prepare_for_optimization(_model())
    with pytest.raises(PassFailedError, match=r"pass explode failed after \[negations, relus\]"):
        PassManager([DOUBLE_NEG, RELU_IDENTITY, FunctionPass("explode", explode)]).run(model)
    model = prepare_for_optimization(_model())
    with pytest.raises(PassFailedError, match=r"pass rename failed after \[\].*used twice"):
        PassManager([FunctionPass("rename", duplicate_names)]).run(model)


def test_function_pass_diff_is_one_step() -> None:
    def drop_relu(model: ir.Model, context: PassContext) -> bool:
        relu = next(n for n in model.graph if n.op_type == "Relu")
        relu.outputs[0].replace_all_uses_with(relu.inputs[0], replace_graph_outputs=True)
        model.graph.remove(relu, safe=True)
        return True

    model = prepare_for_optimization(_model())
    recorder = StepRecorder()
    PassManager([FunctionPass("drop_relu", drop_relu)], [recorder]).run(model)
    (step,) = recorder.steps
    assert step.rule is None and step.removed == ("relu",) and step.added == ()
    assert "test_manager.py" in step.rule_source


def test_verifier_names_the_broken_node() -> None:
    model = _model()
    verify_graph(model)
    nodes = list(model.graph)
    model.graph.remove(nodes[0], safe=False)
    with pytest.raises(GraphVerificationError, match="'neg_1'.*used before it is defined"):
        verify_graph(model)


def test_canonical_text_lists_nodes_in_order() -> None:
    text = canonical_text(_model(direct_input=True))
    assert "neg_1 = Neg(x) -> a\nneg_2 = Neg(a) -> b\nrelu = Relu(b) -> y\n" in text
    assert isinstance(onnx.__version__, str)


def test_constant_only_changes_are_named_in_the_step() -> None:
    def drop_unused_constant(model: ir.Model, context: PassContext) -> bool:
        model.graph.initializers.pop("unused")
        return True

    model = prepare_for_optimization(_model())
    model.graph.register_initializer(
        ir.Value(name="unused", const_value=ir.tensor(np.zeros(3, np.float32)))
    )
    recorder = StepRecorder()
    PassManager([FunctionPass("drop", drop_unused_constant)], [recorder]).run(model)
    (step,) = recorder.steps
    assert step.initializers_removed == ("unused",) and step.removed == ()
    assert step.summary().endswith("(constants -1 +0)")
    assert Step.from_json(step.to_json()).initializers_removed == ("unused",)

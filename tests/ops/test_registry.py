"""The op registry covers what CNNs, detectors and transformers need, each op complete."""

from __future__ import annotations

import pytest

from engine.ops.registry import FAMILY_MODULES, OpRegistry, OpSpec, default_registry

# The op list of the foundation issue (what exporters emit for CNNs, detectors, transformers).
REQUIRED_OPS = """
Add Sub Mul Div Pow Sqrt Exp Log Erf Tanh Sigmoid Relu LeakyRelu PRelu Elu Selu Clip HardSigmoid
HardSwish Gelu Softplus Mish Neg Abs Floor Ceil Round Sign Reciprocal Min Max Mean Sum Where
Equal Less LessOrEqual Greater GreaterOrEqual And Or Xor Not Cast CastLike Conv ConvTranspose
BatchNormalization InstanceNormalization LayerNormalization GroupNormalization MaxPool AveragePool
GlobalAveragePool GlobalMaxPool Gemm MatMul Einsum Softmax LogSoftmax Dropout Resize Pad Reshape
Transpose Flatten Squeeze Unsqueeze Concat Split Slice Gather GatherElements Shape Size
ConstantOfShape Expand Tile Range Identity ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd
ReduceL2 ArgMax ArgMin TopK CumSum DepthToSpace SpaceToDepth Trilu NonZero QuantizeLinear
DequantizeLinear LSTM GRU If Loop
""".split()


@pytest.mark.parametrize("op_type", REQUIRED_OPS)
def test_required_op_is_registered(op_type: str) -> None:
    spec = default_registry().lookup(op_type)
    assert spec is not None, f"{op_type} has no reference kernel"
    assert callable(spec.kernel) and callable(spec.shape_rule) and callable(spec.cost)


def test_every_family_module_contributes_and_keys_are_unique() -> None:
    import importlib

    seen: set[tuple[str, str]] = set()
    for module_name in FAMILY_MODULES:
        ops = importlib.import_module(module_name).OPS
        assert ops, f"{module_name} registers nothing"
        for spec in ops:
            assert isinstance(spec, OpSpec)
            assert spec.key not in seen, f"{spec.key} registered twice"
            seen.add(spec.key)
    assert len(default_registry()) == len(seen)


def test_duplicate_registration_is_refused_and_domains_normalise() -> None:
    spec = default_registry().lookup("Relu")
    assert spec is not None
    registry = OpRegistry([spec])
    with pytest.raises(ValueError, match="registered twice"):
        registry.add(spec)
    assert registry.lookup("Relu", "ai.onnx") is spec
    assert registry.lookup("Relu", "com.example") is None

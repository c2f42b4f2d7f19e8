"""2:4 sparsity in the builder and the advisor on a zoo CNN."""

from __future__ import annotations

import numpy as np
import pytest

from engine import zoo
from engine.build.timing import FakeTimer
from engine.builder import build
from engine.config import BuilderConfig, SparsityMode
from engine.onnx_io import load
from engine.sparsity.advisor import advise, expected_speedup
from engine.sparsity.check import check_model, is_2_4, reduction_matrix
from engine.sparsity.prune import prune_model

FORCE = BuilderConfig(sparsity=SparsityMode.FORCE, sparsity_min_channels=16, timing_iterations=1)


@pytest.fixture(scope="module")
def resnet():
    proto = zoo.build("resnet")
    return load(proto), zoo.make_inputs(proto, seed=1)


def _sparse_message(engine, layer: str) -> list[str]:
    return [e.message for e in engine.log.entries if e.stage == "sparsity" and e.layer == layer]


def test_force_prunes_every_eligible_layer_and_logs_each_verdict(resnet) -> None:
    model, feeds = resnet
    engine = build(model, FORCE)
    eligible = [c for c in check_model(engine.plan.model, min_channels=16) if c.eligible]
    assert len(eligible) == 10
    for layer in eligible:
        planned = engine.plan.layer(layer.name)
        weight = engine.plan.constants[planned.inputs[1]]
        assert is_2_4(reduction_matrix(weight, planned.op_type, planned.attrs))
        messages = _sparse_message(engine, layer.name)
        assert any(m.startswith("pruned to 2:4") for m in messages)
        assert any("sparse_2_4 was" in m or "sparse tactic picked" in m for m in messages)
    stem = engine.plan.layers[0].name  # 3 input channels
    assert any("K = 3 is not a multiple of 4" in m for m in _sparse_message(engine, stem))
    dense = build(model, BuilderConfig(tactic_sources=frozenset({"reference"})))
    ours, theirs = engine.run(feeds)["output"], dense.run(feeds)["output"]
    assert not np.allclose(ours, theirs)  # pruning changed the model...
    assert np.isfinite(ours).all()


def test_the_sparse_tactic_is_picked_when_it_times_faster_and_computes_the_same(resnet) -> None:
    model, feeds = resnet
    timer = FakeTimer({"sparse_2_4": 0.5}, default_ms=1.0)
    sparse = build(model, FORCE.with_changes(timing_cache_path=None), timer=timer)
    picked = [layer.name for layer in sparse.plan.layers if layer.tactic == "sparse_2_4"]
    assert len(picked) == 10
    assert all(any("sparse tactic picked" in m for m in _sparse_message(sparse, n)) for n in picked)
    dense_tactics = build(
        model, FORCE.with_changes(tactic_sources=frozenset({"reference"}), timing_cache_path=None)
    )
    np.testing.assert_allclose(
        sparse.run(feeds)["output"], dense_tactics.run(feeds)["output"], rtol=1e-4, atol=1e-5
    )


def test_on_offers_the_sparse_tactic_only_to_2_4_weights(resnet) -> None:
    model, _ = resnet
    on = BuilderConfig(sparsity=SparsityMode.ON, sparsity_min_channels=16, timing_iterations=1)
    engine = build(model, on, timer=FakeTimer({"sparse_2_4": 0.5}, default_ms=1.0))
    assert not any(layer.tactic == "sparse_2_4" for layer in engine.plan.layers)
    assert any("not 2:4" in e.message for e in engine.log.entries if e.stage == "sparsity")
    pruned, _ = prune_model(model, min_channels=16)
    engine = build(pruned, on, timer=FakeTimer({"sparse_2_4": 0.5}, default_ms=1.0))
    assert sum(layer.tactic == "sparse_2_4" for layer in engine.plan.layers) == 10
    off = build(pruned, BuilderConfig(timing_iterations=1), timer=FakeTimer({"sparse_2_4": 0.5}))
    assert not any(layer.tactic == "sparse_2_4" for layer in off.plan.layers)


def test_the_advisor_lists_every_weight_layer_with_a_reason_and_measures(resnet) -> None:
    model, feeds = resnet
    report = advise(model, feeds, min_channels=16)
    assert len(report) == 11  # 10 convolutions + the fc Gemm
    for item in report:
        if item.eligible:
            assert item.reason == ""
            assert 0.5 < item.retained_magnitude < 1.0
            assert item.output_cosine is not None and item.output_cosine < 1.0
            assert item.expected_speedup is not None and item.expected_speedup >= 1.0
        else:
            assert item.reason and item.output_cosine is None
        assert item.measured_speedup is None  # no GPU backend here
    strict = advise(model, feeds)  # NVIDIA's 256-channel guidance: all too small
    assert all(not a.eligible and a.reason.startswith("too small") for a in strict[1:])


def test_expected_speedup_follows_the_roofline() -> None:
    big = expected_speedup(
        flops=2 * 4096**3, moved_bytes=3 * 4096 * 4096 * 2, weight_bytes=4096**2 * 2
    )
    assert 1.8 < big <= 2.0  # compute bound: sparse tensor cores double the rate
    tiny = expected_speedup(flops=1000, moved_bytes=4000, weight_bytes=2000)
    assert tiny == pytest.approx(1.0, abs=0.01)  # launch bound: nothing to gain


def test_int8_sparse_layers_equal_the_dense_int8_engine_exactly(resnet) -> None:
    from engine.config import Precision

    model, feeds = resnet
    calibration = [zoo.make_inputs(zoo.build("resnet"), seed=s) for s in range(2)]
    config = FORCE.with_changes(
        precisions=frozenset({Precision.FP32, Precision.INT8}), timing_cache_path=None
    )
    timer = FakeTimer({"sparse_2_4": 0.5}, default_ms=1.0)
    sparse = build(model, config, timer=timer, calibration_data=calibration)
    int8 = [layer for layer in sparse.plan.layers if layer.op_type in ("QConv", "QGemm")]
    assert sum(layer.tactic == "sparse_2_4" for layer in int8) == 10
    dense = build(
        model,
        config.with_changes(tactic_sources=frozenset({"reference"})),
        calibration_data=calibration,
    )
    np.testing.assert_array_equal(sparse.run(feeds)["output"], dense.run(feeds)["output"])

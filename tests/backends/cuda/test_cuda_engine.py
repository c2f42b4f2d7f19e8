"""Whole engines on the CUDA backend, run on the CPU shim (``backend="cuda-shim"``).

The builder picks CUDA tactics, the lowering turns every layer into kernel launches on offsets
of one arena (plus weights / io / scratch regions), and the shim device runs the real .cu
sources compiled with g++. Outputs are compared with the NumPy engine of the same model and
config (the oracle), with onnxruntime for zoo models. Streams are checked by running the
schedule in random interleavings that respect only its events; a schedule with its events
removed must then go wrong.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine import zoo
from engine.backends.cuda.engine import CudaEngine
from engine.backends.cuda.executor import CudaRunner
from engine.backends.cuda.launch_plan import HostStep, KernelLaunch, LibraryGemm
from engine.backends.cuda.lowering import LoweringError, lower_launch_plan
from engine.backends.cuda.selection import CudaTacticSource
from engine.backends.cuda.setup import SHIM_DEVICE
from engine.backends.cuda.shim_device import ShimDevice
from engine.backends.cuda.streams import dependencies, schedule
from engine.build.log import BuildLog
from engine.build.selector import select_tactics
from engine.build.timing import WallClockTimer
from engine.builder import build
from engine.config import BuilderConfig, Precision, SparsityMode
from engine.serialize import load_engine, save_engine

pytestmark = pytest.mark.xdist_group("cuda-shim")
RNG = np.random.default_rng(5)
SHIM = BuilderConfig(backend="cuda-shim")


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def tiny_cnn() -> ir.Model:
    """conv+relu -> maxpool -> conv + residual add + relu -> global pool -> flatten -> fc."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "p1"], ["a2"], name="add2"),
        helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc"),
    ]
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        [
            _init("w1", rng.standard_normal((8, 4, 3, 3)) * 0.3),
            _init("b1", rng.standard_normal(8)),
            _init("w2", rng.standard_normal((8, 8, 3, 3)) * 0.2),
            _init("b2", rng.standard_normal(8)),
            _init("wf", rng.standard_normal((5, 8))),
            _init("bf", rng.standard_normal(5)),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(model)


def branches() -> ir.Model:
    """Two independent conv branches of one input, joined by an add (streams can overlap)."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1], name="branch_a"),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="branch_b"),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Sigmoid", ["b"], ["sb"], name="sigmoid_b"),
        helper.make_node("Add", ["ra", "sb"], ["y"], name="join"),
    ]
    graph = helper.make_graph(
        nodes,
        "branches",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])],
        [
            _init("wa", rng.standard_normal((4, 3, 3, 3))),
            _init("wb", rng.standard_normal((4, 3, 1, 1))),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(model)


def mlp() -> ir.Model:
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1, name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        [
            _init("w1", rng.standard_normal((48, 32)) * 0.2),
            _init("b1", rng.standard_normal(48)),
            _init("w2", rng.standard_normal((8, 48)) * 0.2),
            _init("b2", rng.standard_normal(8)),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(model)


def cnn_feeds() -> dict[str, np.ndarray]:
    return {"x": RNG.standard_normal((1, 4, 6, 6)).astype(np.float32)}


def launches(plan) -> list[KernelLaunch]:  # type: ignore[no-untyped-def]
    return [s for s in plan.steps if isinstance(s, KernelLaunch)]


def test_tiny_cnn_runs_as_cuda_kernels_and_matches_the_numpy_engine() -> None:
    feeds = cnn_feeds()
    expected = build(tiny_cnn()).run(feeds)["y"]
    engine = build(tiny_cnn(), SHIM)
    assert isinstance(engine, CudaEngine)
    got = engine.run(feeds)["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    plan = engine.launch_plan(feeds)
    assert plan.host_layers == [] and plan.graph_capturable
    entries = [launch.entry for launch in launches(plan)]
    # one layout change for the whole NHWC chain: the input (the pooled 1x1 needs none)
    assert entries.count("gie_nchw_to_nhwc_f32") == 1
    assert "gie_nhwc_to_nchw_f32" not in entries
    assert "gie_conv_implicit_gemm_f32" in entries and "gie_max_pool_f32" in entries
    assert set(plan.region_bytes) == {"weights", "arena", "io", "scratch"}
    assert plan.region_bytes["arena"] == engine.memory.arena_bytes
    arena = [b for s in launches(plan) for b in s.writes if b.region == "arena"]
    assert arena and all(b.offset + b.nbytes <= engine.memory.arena_bytes for b in arena)


def test_fp16_engine_uses_half_kernels_and_stays_within_fp16_error() -> None:
    feeds = cnn_feeds()
    config = BuilderConfig(precisions=frozenset({Precision.FP32, Precision.FP16}))
    expected = build(tiny_cnn(), config).run(feeds)["y"]
    engine = build(tiny_cnn(), replace(config, backend="cuda-shim"))
    got = engine.run(feeds)["y"]
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-2)
    entries = {launch.entry for launch in launches(engine.launch_plan(feeds))}
    assert "gie_conv_implicit_gemm_f16" in entries or "gie_conv_mma_f16" in entries
    assert any(e.startswith("gie_cast_f32_to_f16") or "pointwise" in e for e in entries)


@pytest.mark.parametrize(
    ("sources", "entry"),
    [
        (None, "gie_gemm_int8"),  # IMMA
        (frozenset({"cublas", "reformat", "pointwise", "reshape"}), "gie_requant"),  # cuBLAS
    ],
)
def test_int8_engine_is_bit_exact_with_the_numpy_int8_engine(sources, entry: str) -> None:
    config = BuilderConfig(precisions=frozenset({Precision.FP32, Precision.INT8}))
    calibration = [{"x": RNG.standard_normal((4, 32)).astype(np.float32)} for _ in range(4)]
    reference = build(mlp(), config, calibration_data=calibration)
    shim = replace(config, backend="cuda-shim", tactic_sources=sources)
    engine = build(mlp(), shim, calibration_data=calibration)
    assert [layer.qualified_op for layer in engine.plan.layers].count("gie::QGemm") == 2
    feeds = {"x": RNG.standard_normal((4, 32)).astype(np.float32)}
    np.testing.assert_array_equal(engine.run(feeds)["y"], reference.run(feeds)["y"])
    entries = {launch.entry for launch in launches(engine.launch_plan(feeds))}
    assert any(e.startswith(entry) for e in entries), entries


@pytest.mark.parametrize("precision", [Precision.FP16, Precision.INT8])
def test_sparse_engines_run_mma_sp_kernels(precision: Precision) -> None:
    config = BuilderConfig(
        precisions=frozenset({Precision.FP32, precision}),
        sparsity=SparsityMode.FORCE,
        sparsity_min_channels=8,
        tactic_sources=frozenset({"sparse", "reformat", "pointwise", "reshape"}),
    )
    calibration = [{"x": RNG.standard_normal((4, 32)).astype(np.float32)} for _ in range(4)]
    reference = build(mlp(), replace(config, tactic_sources=None), calibration_data=calibration)
    engine = build(mlp(), replace(config, backend="cuda-shim"), calibration_data=calibration)
    sparse = [layer.name for layer in engine.plan.layers if layer.tactic.startswith("gemm_sparse")]
    assert sparse, [(layer.name, layer.tactic) for layer in engine.plan.layers]
    feeds = {"x": RNG.standard_normal((4, 32)).astype(np.float32)}
    got, expected = engine.run(feeds)["y"], reference.run(feeds)["y"]
    if precision == Precision.INT8 and len(sparse) == 2:
        np.testing.assert_array_equal(got, expected)
    else:
        np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("pins", "kind"),
    [
        ((("fc", "cublas_fp32"), ("relu1/ConvAct", "im2col_cublas_fp32")), LibraryGemm),
        ((("relu1/ConvAct", "conv_igemm_f32_128x64"),), KernelLaunch),
    ],
)
def test_pinned_tactics_lower_to_their_kernels(pins: tuple, kind: type) -> None:
    feeds = cnn_feeds()
    expected = build(tiny_cnn()).run(feeds)["y"]
    engine = build(tiny_cnn(), replace(SHIM, tactic_pins=pins))
    assert {engine.plan.layer(name).tactic for name, _ in pins} == {t for _, t in pins}
    np.testing.assert_allclose(engine.run(feeds)["y"], expected, rtol=1e-5, atol=1e-6)
    assert any(isinstance(step, kind) for step in engine.launch_plan(feeds).steps)


def test_streams_overlap_branches_and_their_events_are_what_keeps_results_right() -> None:
    feeds = {"x": RNG.standard_normal((1, 3, 5, 5)).astype(np.float32)}
    expected = build(branches()).run(feeds)["y"]
    engine = build(branches(), replace(SHIM, cuda_streams=3, optimization_level="O0"))
    plan = engine.launch_plan(feeds)
    sched = schedule(plan.steps, 3)
    assert sched.streams >= 2 and sched.cross_stream_waits() >= 1
    for seed in range(4):
        runner = CudaRunner(plan, ShimDevice(interleave=True, seed=seed), streams=3)
        np.testing.assert_allclose(runner.run(feeds)["y"], expected, rtol=1e-5, atol=1e-6)
    wrong = 0
    for seed in range(8):
        runner = CudaRunner(plan, ShimDevice(interleave=True, seed=seed), streams=3)
        runner.schedule.waits = [[] for _ in runner.schedule.waits]  # events removed
        out = runner.run(feeds)["y"]
        wrong += not np.allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert wrong > 0


def test_dependencies_cover_reads_after_writes_and_slot_reuse() -> None:
    feeds = cnn_feeds()
    plan = build(tiny_cnn(), SHIM).launch_plan(feeds)
    deps = dependencies(plan.steps)
    for j, step in enumerate(plan.steps):
        for i in range(j):
            earlier = plan.steps[i]
            reads = {b.span() for b in step.reads}
            if any(w.span() in reads for w in earlier.writes):
                assert i in deps[j], (earlier.describe(), step.describe())
    assert schedule(plan.steps, 1).cross_stream_waits() == 0


def test_layers_without_a_cuda_kernel_fall_back_to_the_host() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("ReduceMean", ["r"], ["m"], axes=[1], keepdims=1, name="mean"),
        helper.make_node("Sub", ["r", "m"], ["y"], name="centre"),
    ]
    graph = helper.make_graph(
        nodes,
        "host",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 7])],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    feeds = {"x": RNG.standard_normal((3, 7)).astype(np.float32)}
    engine = build(model, SHIM)
    assert engine.plan.layer("mean").tactic == "host"
    assert any("mean" in entry.layer and "host" in entry.message for entry in engine.log.entries)
    plan = engine.launch_plan(feeds)
    assert plan.host_layers == ["mean"] and not plan.graph_capturable
    assert isinstance(next(s for s in plan.layers if s.name == "mean").steps[0], HostStep)
    expected = build(model).run(feeds)["y"]
    np.testing.assert_allclose(engine.run(feeds)["y"], expected, rtol=1e-6)


def test_shape_arithmetic_is_folded_at_lowering() -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "first"], ["n"], axis=0, name="batch"),
        helper.make_node("Unsqueeze", ["n", "zero"], ["n1"], name="unsqueeze"),
        helper.make_node("Concat", ["n1", "minus_one"], ["target"], axis=0, name="target"),
        helper.make_node("Reshape", ["x", "target"], ["y"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes,
        "fold",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12])],
        [
            numpy_helper.from_array(np.array(0, np.int64), "first"),
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        ],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    feeds = {"x": RNG.standard_normal((2, 3, 4)).astype(np.float32)}
    engine = build(model, replace(SHIM, optimization_level="O0"))
    plan = engine.launch_plan(feeds)
    folded = [layer.name for layer in plan.layers if layer.tactic == "folded"]
    assert {"shape", "batch", "unsqueeze", "target"} <= set(folded)
    assert plan.host_layers == []
    np.testing.assert_array_equal(engine.run(feeds)["y"], feeds["x"].reshape(2, 12))


def test_profile_and_observed_runs_read_layers_back() -> None:
    feeds = cnn_feeds()
    engine = build(tiny_cnn(), SHIM)
    reference = build(tiny_cnn())
    seen: dict[str, np.ndarray] = {}
    engine.run_observed(feeds, lambda layer, ins, outs: seen.setdefault(layer.name, outs[0]))
    wanted: dict[str, np.ndarray] = {}
    reference.run_observed(
        feeds, lambda layer, ins, outs: wanted.setdefault(layer.name, outs[0].copy())
    )
    assert set(seen) == set(wanted)
    for name, value in wanted.items():
        np.testing.assert_allclose(seen[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    report = engine.profile(iterations=1, warmup=0, feeds=feeds)
    assert [row.layer for row in report.layers] == [layer.name for layer in engine.plan.layers]
    assert all(row.latency_ms_median > 0 for row in report.layers)
    assert {row.tactic for row in report.layers} >= {"max_pool_f32"}


def test_cuda_engine_file_round_trip(tmp_path: Path) -> None:
    feeds = cnn_feeds()
    engine = build(tiny_cnn(), SHIM)
    path = save_engine(engine, tmp_path / "tiny.gie")
    loaded = load_engine(path)
    assert isinstance(loaded, CudaEngine)
    assert [layer.tactic for layer in loaded.plan.layers] == [
        layer.tactic for layer in engine.plan.layers
    ]
    np.testing.assert_array_equal(loaded.run(feeds)["y"], engine.run(feeds)["y"])


def test_timed_selection_times_every_candidate_as_launches() -> None:
    engine = build(tiny_cnn(), SHIM)
    plan = engine.plan
    log = BuildLog()
    source = CudaTacticSource(SHIM_DEVICE, ShimDevice(), SHIM, log, timed=True)
    stats = select_tactics(plan, SHIM, log, timer=WallClockTimer(0, 1, 0.0), source=source)
    conv = plan.layer("relu1/ConvAct")
    assert len(conv.candidates) >= 3 and stats.timed >= 3
    assert all(c.samples == 1 for c in conv.candidates), conv.candidates
    assert conv.tactic in {c.tactic for c in conv.candidates}


def test_a_launch_writing_what_it_reads_through_another_view_is_refused() -> None:
    engine = build(tiny_cnn(), SHIM)
    plan = engine.plan
    gemm = plan.layer("fc")

    def aliasing(ctx) -> None:  # type: ignore[no-untyped-def]
        x = ctx.input(0)
        ctx.output(0)
        shifted = replace(x, offset=x.offset + 4, shape=(1, 4))
        ctx.launch("elementwise.cu", "gie_bias_act_f32", (1,), (32,),
                   (x.with_shape((1, 8)), None, shifted, 1, 4, 0, 0.0, 0.0))  # fmt: skip

    from engine.backends.cuda.lowerings import all_lowerings

    lowerings = {**all_lowerings(), gemm.tactic: aliasing}
    with pytest.raises(LoweringError, match="'fc'.*overlapping"):
        lower_launch_plan(plan, engine.memory, {"x": (1, 4, 6, 6)}, lowerings)


@pytest.mark.parametrize("name", ["resnet", "bert_opset17", "gpt_block", "detector_head"])
def test_zoo_models_on_the_shim_match_onnxruntime(name: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    proto = zoo.build(name)
    feeds = zoo.make_inputs(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    engine = build(ir.serde.deserialize_model(proto), replace(SHIM, optimization_level="O3"))
    plan = engine.launch_plan(feeds)
    assert plan.host_layers == [], plan.notes
    got = engine.run(feeds)
    for output, value in expected.items():
        np.testing.assert_allclose(got[output], value, rtol=1e-4, atol=1e-4, err_msg=output)


def test_split_and_expand_run_as_strided_copies() -> None:
    nodes = [
        helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1, name="split"),
        helper.make_node("Relu", ["b"], ["rb"], name="relu"),
        helper.make_node("Expand", ["a", "shape"], ["e"], name="expand"),
    ]
    graph = helper.make_graph(
        nodes,
        "split",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 3])],
        [
            helper.make_tensor_value_info("rb", TensorProto.FLOAT, [2, 4, 3]),
            helper.make_tensor_value_info("e", TensorProto.FLOAT, [3, 2, 2, 3]),
        ],
        [
            numpy_helper.from_array(np.array([2, 4], np.int64), "sizes"),
            numpy_helper.from_array(np.array([3, 2, 2, 3], np.int64), "shape"),
        ],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    feeds = {"x": RNG.standard_normal((2, 6, 3)).astype(np.float32)}
    engine = build(model, replace(SHIM, optimization_level="O0"))
    plan = engine.launch_plan(feeds)
    assert plan.host_layers == []
    assert sum(launch.entry == "gie_slice_b4" for launch in launches(plan)) == 3
    got, expected = engine.run(feeds), build(model).run(feeds)
    for name in ("rb", "e"):
        np.testing.assert_array_equal(got[name], expected[name])


def test_graph_path_captures_once_and_replays_with_new_feeds() -> None:
    engine = build(tiny_cnn(), SHIM)
    first, second = cnn_feeds(), cnn_feeds()
    plan = engine.launch_plan(first)
    runner = CudaRunner(plan, ShimDevice(graphs=True), streams=2)
    assert runner.use_graph
    for feeds in (first, second, first):
        expected = build(tiny_cnn()).run(feeds)["y"]
        np.testing.assert_allclose(runner.run(feeds)["y"], expected, rtol=1e-5, atol=1e-6)
    assert runner.graph_replays == 3
    graph = runner._graph
    assert graph is not None and len(graph) >= plan.kernel_count()
    host = build(tiny_cnn(), replace(SHIM, tactic_pins=(("fc", "host"),))).launch_plan(first)
    assert not CudaRunner(host, ShimDevice(graphs=True)).use_graph  # a host step: no graph


@pytest.mark.parametrize(
    "attributes",
    [
        {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
        {"strides": [2, 1], "dilations": [1, 2], "group": 2},
        {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
    ],
)
def test_conv_transpose_runs_as_a_cuda_kernel(attributes: dict) -> None:
    rng = np.random.default_rng(3)
    group = attributes.get("group", 1)
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="up", **attributes)]
    graph = helper.make_graph(
        nodes,
        "up",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            _init("w", rng.standard_normal((4, 6 // group, 3, 3))),
            _init("b", rng.standard_normal(6)),
        ],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    feeds = {"x": RNG.standard_normal((1, 4, 5, 4)).astype(np.float32)}
    engine = build(model, SHIM)
    assert engine.plan.layer("up").tactic == "conv_transpose_f32"
    np.testing.assert_allclose(
        engine.run(feeds)["y"], build(model).run(feeds)["y"], rtol=1e-5, atol=1e-5
    )


def test_a_profile_engine_lowers_once_per_input_shape() -> None:
    from engine.config import ShapeProfile

    rng = np.random.default_rng(4)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1, name="fc"),
            helper.make_node("Relu", ["h"], ["y"], name="relu"),
        ],
        "dynamic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [_init("w", rng.standard_normal((8, 16))), _init("b", rng.standard_normal(8))],
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    profile = ShapeProfile("x", (1, 16), (4, 16), (8, 16))
    engine = build(model, replace(SHIM, profiles=(profile,)))
    reference = build(model, BuilderConfig(profiles=(profile,)))
    for batch in (4, 1, 8, 4):
        feeds = {"x": RNG.standard_normal((batch, 16)).astype(np.float32)}
        got = engine.run(feeds)["y"]
        assert got.shape == (batch, 8)
        np.testing.assert_allclose(got, reference.run(feeds)["y"], rtol=1e-5, atol=1e-6)
    assert len(engine._runners) == 3  # one launch plan per shape set, reused

"""The persistent LSTM/GRU kernels (kernels/rnn.cu) on the CPU shim vs the NumPy reference.

One launch runs every time step (grid = batch x directions); the reference is engine/ops/rnn.py
(ONNX LSTM/GRU). Cases cover forward/reverse/bidirectional, with and without B, initial states,
peepholes, input_forget, linear_before_reset 0/1, clip, per-batch sequence lengths (including 0
and reversed entries), layout 1, both weight layouts, blocks smaller than H (threads loop over
units) and the documented X @ W^T pre-pass (xw) computed by gemm_simt. fp32 matches at rtol
1e-4; fp16 storage (fp32 math and state) is compared with the fp32 reference on the same
fp16-rounded inputs at 1e-2. The file compiles for sm_80 and sm_90 with no local-memory spills,
also at non-default -D sizes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from engine.backends.cuda import lower_rnn, nvrtc, shim_runner
from engine.backends.cuda.launch_plan import DeviceBuffer, KernelLaunch, LaunchPlan
from engine.backends.cuda.lowering import lower_launch_plan
from engine.backends.cuda.nvrtc import KERNEL_DIR
from engine.build.memory import plan_memory
from engine.build.plan import lower
from engine.config import BuilderConfig
from engine.ops.registry import Attrs, KernelContext, TensorSpec, default_registry

REGISTRY = default_registry()
RNG = np.random.default_rng(29)
DIRECTIONS = {"forward": 0, "reverse": 1, "bidirectional": 2}
pytestmark = pytest.mark.xdist_group("cuda-shim")


@dataclass(frozen=True)
class RnnCase:
    op: str  # "LSTM" or "GRU"
    seq: int
    batch: int
    input: int
    hidden: int
    direction: str = "forward"
    bias: bool = True
    initial: bool = False  # initial_h (and initial_c for LSTM)
    peepholes: bool = False
    lengths: tuple[int, ...] | None = None
    clip: float | None = None
    linear_before_reset: int = 0
    input_forget: int = 0
    layout: int = 0
    transposed: int = 0  # weights given as [dirs, K, G*H]
    block: int = 32

    @property
    def gates(self) -> int:
        return 4 if self.op == "LSTM" else 3

    @property
    def dirs(self) -> int:
        return 2 if self.direction == "bidirectional" else 1

    def attributes(self) -> dict:
        attrs: dict = {"hidden_size": self.hidden, "direction": self.direction}
        if self.clip is not None:
            attrs["clip"] = self.clip
        if self.layout:
            attrs["layout"] = 1
        if self.op == "GRU":
            attrs["linear_before_reset"] = self.linear_before_reset
        elif self.input_forget:
            attrs["input_forget"] = 1
        return attrs


@dataclass
class RnnInputs:
    x: np.ndarray
    w: np.ndarray
    r: np.ndarray
    b: np.ndarray | None
    lengths: np.ndarray | None
    h0: np.ndarray | None
    c0: np.ndarray | None
    p: np.ndarray | None

    def astype(self, dtype: type) -> RnnInputs:
        def cast(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None or a.dtype == np.int32 else a.astype(dtype)

        return RnnInputs(
            cast(self.x), cast(self.w), cast(self.r), cast(self.b), self.lengths,
            cast(self.h0), cast(self.c0), cast(self.p),
        )  # fmt: skip


def make_inputs(case: RnnCase) -> RnnInputs:
    g, h, d = case.gates, case.hidden, case.dirs
    x_shape = (
        (case.batch, case.seq, case.input) if case.layout else (case.seq, case.batch, case.input)
    )
    state = (case.batch, d, h) if case.layout else (d, case.batch, h)

    def rand(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (scale * RNG.standard_normal(shape)).astype(np.float32)

    lstm = case.op == "LSTM"
    return RnnInputs(
        x=rand(*x_shape),
        w=rand(d, g * h, case.input, scale=0.5),
        r=rand(d, g * h, h, scale=0.5),
        b=rand(d, 2 * g * h, scale=0.5) if case.bias else None,
        lengths=None if case.lengths is None else np.array(case.lengths, np.int32),
        h0=rand(*state) if case.initial else None,
        c0=rand(*state) if case.initial and lstm else None,
        p=rand(d, 3 * h, scale=0.5) if case.peepholes and lstm else None,
    )


def reference(case: RnnCase, inputs: RnnInputs) -> list[np.ndarray]:
    spec = REGISTRY.lookup(case.op, "")
    assert spec is not None
    values = [inputs.x, inputs.w, inputs.r, inputs.b, inputs.lengths, inputs.h0]
    if case.op == "LSTM":
        values += [inputs.c0, inputs.p]
    count = 3 if case.op == "LSTM" else 2
    context = KernelContext(opset=22, output_count=count)
    return [np.asarray(v) for v in spec.kernel(values, Attrs(case.attributes()), context)]


def library(cache: Path, file_name: str = "rnn.cu") -> shim_runner.ShimLibrary:
    return shim_runner.build_file(KERNEL_DIR / file_name, cache)


def transpose_weight(m: np.ndarray) -> np.ndarray:
    """[dirs, G*H, K] -> [dirs, K, G*H] (the kernel's weights_transposed = 1 layout)."""
    return np.ascontiguousarray(m.transpose(0, 2, 1))


def run_kernel(
    lib: shim_runner.ShimLibrary,
    case: RnnCase,
    inputs: RnnInputs,
    dtype: type,
    xw: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Launch the persistent kernel once; outputs start as NaN so unwritten values show."""
    seq, batch, hidden, d = case.seq, case.batch, case.hidden, case.dirs
    y_shape = (batch, seq, d, hidden) if case.layout else (seq, d, batch, hidden)
    state = (batch, d, hidden) if case.layout else (d, batch, hidden)
    y = np.full(y_shape, np.nan, dtype)
    y_h = np.full(state, np.nan, dtype)
    y_c = np.full(state, np.nan, dtype)
    w, r = inputs.w, inputs.r
    if case.transposed:
        w, r = transpose_weight(w), transpose_weight(r)
    suffix = "f32" if dtype == np.float32 else "f16"
    clip = -1.0 if case.clip is None else case.clip
    scalars = [seq, batch, case.input, hidden, DIRECTIONS[case.direction], case.layout]
    scalars += [case.transposed, clip]
    common = [inputs.x, w, r, inputs.b, inputs.lengths, inputs.h0]
    if case.op == "LSTM":
        args = [*common, inputs.c0, inputs.p, xw, y, y_h, y_c, *scalars, case.input_forget]
        lib.launch(f"gie_lstm_persistent_{suffix}", (batch, d), case.block, args)
        return [y, y_h, y_c]
    args = [*common, xw, y, y_h, *scalars, case.linear_before_reset]
    lib.launch(f"gie_gru_persistent_{suffix}", (batch, d), case.block, args)
    return [y, y_h]


def assert_outputs(got: list[np.ndarray], want: list[np.ndarray], rtol: float, atol: float):
    assert len(got) == len(want)
    for index, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, index
        assert np.isfinite(g).all(), f"output {index} has unwritten values"
        np.testing.assert_allclose(
            g.astype(np.float32), w, rtol=rtol, atol=atol, err_msg=str(index)
        )


LSTM_CASES = [
    RnnCase("LSTM", 3, 1, 3, 4),
    RnnCase("LSTM", 4, 2, 5, 6, "reverse", initial=True),
    RnnCase("LSTM", 5, 3, 7, 9, "bidirectional", initial=True, peepholes=True, block=4),
    RnnCase("LSTM", 4, 2, 3, 5, bias=False, peepholes=True, clip=0.7),
    RnnCase("LSTM", 5, 3, 4, 7, "bidirectional", lengths=(5, 2, 0), initial=True, peepholes=True),
    RnnCase("LSTM", 4, 3, 6, 8, "reverse", lengths=(1, 4, 3), bias=False, transposed=1, block=3),
    RnnCase("LSTM", 3, 2, 5, 4, "bidirectional", layout=1, initial=True, lengths=(2, 3)),
    RnnCase("LSTM", 4, 2, 3, 6, input_forget=1, peepholes=True, initial=True, clip=1.5),
]

GRU_CASES = [
    RnnCase("GRU", 3, 1, 3, 4),
    RnnCase("GRU", 4, 2, 5, 6, "reverse", initial=True, linear_before_reset=1),
    RnnCase("GRU", 5, 3, 7, 9, "bidirectional", initial=True, block=4),
    RnnCase("GRU", 5, 3, 7, 9, "bidirectional", initial=True, linear_before_reset=1, block=5),
    RnnCase("GRU", 4, 2, 3, 5, bias=False, clip=0.6),
    RnnCase("GRU", 4, 2, 3, 5, bias=False, clip=0.6, linear_before_reset=1),
    RnnCase("GRU", 5, 3, 4, 7, "bidirectional", lengths=(5, 0, 3), linear_before_reset=1),
    RnnCase("GRU", 4, 3, 6, 8, "reverse", lengths=(2, 4, 1), transposed=1, block=3),
    RnnCase("GRU", 3, 2, 5, 4, "bidirectional", layout=1, initial=True, lengths=(3, 1)),
]


def case_id(case: RnnCase) -> str:
    parts = [case.op, case.direction, f"s{case.seq}b{case.batch}i{case.input}h{case.hidden}"]
    flags = {
        "nobias": not case.bias,
        "init": case.initial,
        "peep": case.peepholes,
        "lens": case.lengths is not None,
        "clip": case.clip is not None,
        "lbr": case.linear_before_reset == 1,
        "ifgt": case.input_forget == 1,
        "layout1": case.layout == 1,
        "wT": case.transposed == 1,
    }
    return "-".join(parts + [k for k, v in flags.items() if v])


@pytest.mark.parametrize("case", LSTM_CASES + GRU_CASES, ids=case_id)
def test_persistent_rnn_matches_the_reference_in_fp32(shim_cache, case) -> None:
    inputs = make_inputs(case)
    got = run_kernel(library(shim_cache), case, inputs, np.float32)
    assert_outputs(got, reference(case, inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "case", [LSTM_CASES[2], LSTM_CASES[4], GRU_CASES[2], GRU_CASES[6]], ids=case_id
)
def test_persistent_rnn_with_fp16_storage(shim_cache, case) -> None:
    inputs = make_inputs(case).astype(np.float16)
    got = run_kernel(library(shim_cache), case, inputs, np.float16)
    want = reference(case, inputs.astype(np.float32))
    assert_outputs(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_input_projection_pre_pass_through_gemm_simt(shim_cache, op, dtype) -> None:
    """xw = X @ W^T for all steps by gie_gemm_simt (the documented pre-pass), then one launch."""
    case = RnnCase(op, 5, 3, 6, 7, "bidirectional", initial=True, lengths=(5, 3, 4), layout=1)
    inputs = make_inputs(case).astype(dtype)
    rows = case.seq * case.batch
    columns = case.dirs * case.gates * case.hidden
    w_t = np.ascontiguousarray(inputs.w.reshape(columns, case.input).T)  # [input, dirs*G*H]
    xw = np.full((rows, columns), np.nan, dtype)
    gemm = library(shim_cache, "gemm_simt.cu")
    suffix = "f32" if dtype == np.float32 else "f16"
    args = [inputs.x, w_t, None, None, xw, rows, columns, case.input]
    args += [case.input, columns, columns, 0, 0.0, 0.0, 1]
    gemm.launch(f"gie_gemm_simt_{suffix}", (-(-columns // 64), -(-rows // 64)), 256, args)
    # The kernel must not read X or W when xw is given.
    poisoned = replace_inputs(
        inputs, x=np.full_like(inputs.x, np.nan), w=np.full_like(inputs.w, np.nan)
    )
    got = run_kernel(library(shim_cache), case, poisoned, dtype, xw=xw)
    want = reference(case, inputs.astype(np.float32))
    tolerance = (1e-4, 1e-5) if dtype == np.float32 else (1e-2, 1e-2)
    assert_outputs(got, want, *tolerance)


def replace_inputs(inputs: RnnInputs, **changes: np.ndarray) -> RnnInputs:
    values = dict(inputs.__dict__)
    values.update(changes)
    return RnnInputs(**values)


def test_unwritten_optional_outputs_and_states_stay_untouched(shim_cache) -> None:
    """Null Y / Y_h / Y_c are skipped; a zero-length entry keeps its initial state."""
    case = RnnCase("LSTM", 3, 2, 3, 4, initial=True, lengths=(0, 3))
    inputs = make_inputs(case)
    lib = library(shim_cache)
    y_h = np.full((1, 2, 4), np.nan, np.float32)
    args = [inputs.x, inputs.w, inputs.r, inputs.b, inputs.lengths, inputs.h0, inputs.c0, None]
    args += [None, None, y_h, None, 3, 2, 3, 4, 0, 0, 0, -1.0, 0]
    lib.launch("gie_lstm_persistent_f32", (2, 1), 8, args)
    np.testing.assert_array_equal(y_h[:, 0], inputs.h0[:, 0])
    np.testing.assert_allclose(y_h, reference(case, inputs)[1], rtol=1e-4, atol=1e-5)


def test_bigger_hidden_than_the_block_loops_over_units(shim_cache) -> None:
    """H = 40 with 16 threads: each thread owns 2-3 units (and their cell states)."""
    for op in ("LSTM", "GRU"):
        case = RnnCase(op, 3, 1, 5, 40, "reverse", initial=True, peepholes=True, block=16)
        inputs = make_inputs(case)
        got = run_kernel(library(shim_cache), case, inputs, np.float32)
        assert_outputs(got, reference(case, inputs), rtol=1e-4, atol=1e-5)


# -D variants: (options, register cap of the launch bound, GIE_RNN_MAX_HIDDEN)
VARIANTS = [
    ((), 128, 1024),
    (("-DGIE_RNN_THREADS=1024", "-DGIE_RNN_MAX_HIDDEN=2048"), 64, 2048),
    (("-DGIE_RNN_THREADS=256",), 255, 1024),
]


@pytest.mark.parametrize("arch", nvrtc.DEFAULT_ARCHS)
@pytest.mark.parametrize("extra, register_cap, max_hidden", VARIANTS)
def test_the_file_compiles_without_spills(nvrtc_cache, arch, extra, register_cap, max_hidden):
    entries = {f"gie_{op}_persistent_{s}" for op in ("lstm", "gru") for s in ("f32", "f16")}
    path = KERNEL_DIR / "rnn.cu"
    result = nvrtc.compile_file(path, arch, extra_options=extra, cache=nvrtc_cache)
    assert set(result.resources) == entries, result.resources
    for name, resources in result.resources.items():
        assert not resources.spills, (arch, extra, name, resources)
        assert resources.stack_bytes == 0, (arch, extra, name, resources)
        assert 0 < resources.registers <= register_cap, (arch, extra, name, resources)
    shared = {n: r.shared_bytes for n, r in result.resources.items()}
    for suffix in ("f32", "f16"):
        assert shared[f"gie_lstm_persistent_{suffix}"] == 3 * 4 * max_hidden, shared
        assert shared[f"gie_gru_persistent_{suffix}"] == 5 * 4 * max_hidden, shared


def test_reference_cases_are_not_trivial() -> None:
    """The cases must exercise every path: lengths cut entries short, clip actually clips."""
    case = LSTM_CASES[4]
    outputs = reference(case, make_inputs(case))
    assert np.all(outputs[0][2:, :, 1] == 0) and np.any(outputs[0][:2, :, 1] != 0)
    assert np.all(outputs[0][:, :, 2] == 0)


# --------------------------------------------------------------------------- lowering


def rnn_model(case: RnnCase, inputs: RnnInputs, constant_lengths: bool) -> ir.Model:
    """A one-node model: X and initial_h as graph inputs, W/R/B/P (and the lengths when
    ``constant_lengths``) as initializers; every output of the op is a graph output."""
    from onnx import TensorProto, helper, numpy_helper

    elem = helper.np_dtype_to_tensor_dtype(inputs.x.dtype)
    graph_inputs = [helper.make_tensor_value_info("X", elem, list(inputs.x.shape))]
    initializers = [numpy_helper.from_array(inputs.w, "W"), numpy_helper.from_array(inputs.r, "R")]
    names = ["X", "W", "R", "", "", "", "", ""]
    if inputs.b is not None:
        initializers.append(numpy_helper.from_array(inputs.b, "B"))
        names[3] = "B"
    if inputs.lengths is not None:
        names[4] = "L"
        if constant_lengths:
            initializers.append(numpy_helper.from_array(inputs.lengths, "L"))
        else:
            shape = list(inputs.lengths.shape)
            graph_inputs.append(helper.make_tensor_value_info("L", TensorProto.INT32, shape))
    if inputs.h0 is not None:
        names[5] = "H0"
        graph_inputs.append(helper.make_tensor_value_info("H0", elem, list(inputs.h0.shape)))
    if inputs.c0 is not None:
        names[6] = "C0"
        graph_inputs.append(helper.make_tensor_value_info("C0", elem, list(inputs.c0.shape)))
    if inputs.p is not None:
        initializers.append(numpy_helper.from_array(inputs.p, "P"))
        names[7] = "P"
    count = 8 if case.op == "LSTM" else 6
    while names[count - 1] == "":
        count -= 1
    outputs = ["Y", "Y_h", "Y_c"][: 3 if case.op == "LSTM" else 2]
    node = helper.make_node(case.op, names[:count], outputs, name="rnn", **case.attributes())
    graph_outputs = [helper.make_tensor_value_info(n, elem, None) for n in outputs]
    graph = helper.make_graph([node], "rnn", graph_inputs, graph_outputs, initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])
    return ir.serde.deserialize_model(proto)


def execute_on_shim(plan: LaunchPlan, feeds: dict[str, np.ndarray], cache: Path):
    """Run a launch plan's kernel launches on the CPU shim over NumPy regions."""
    regions = {k: np.zeros(max(v, 1), np.uint8) for k, v in plan.region_bytes.items()}

    def view(buffer: DeviceBuffer) -> np.ndarray:
        raw = regions[buffer.region][buffer.offset : buffer.offset + buffer.nbytes]
        return raw.view(buffer.dtype).reshape(buffer.stored_shape)

    for buffer, array in plan.weights:
        view(buffer)[...] = array.reshape(buffer.stored_shape)
    for name, buffer in plan.inputs.items():
        view(buffer)[...] = feeds[name]
    for step in plan.steps:
        assert isinstance(step, KernelLaunch), step
        assert step.source.file is not None
        defines = "".join(f"#define {k} {v}\n" for k, v in step.source.defines)
        source = defines + (KERNEL_DIR / step.source.file).read_text()
        lib = shim_runner.build(source, step.source.file, cache)
        args = [view(a) if isinstance(a, DeviceBuffer) else a for a in step.args]
        lib.launch(step.entry, step.grid, step.block, args)
    return {name: view(buffer).copy() for name, buffer in plan.outputs.items()}


def built_plan(case: RnnCase, inputs: RnnInputs, tactic: str, constant_lengths: bool = True):
    model = rnn_model(case, inputs, constant_lengths)
    feeds = {"X": inputs.x, "H0": inputs.h0, "C0": inputs.c0}
    if not constant_lengths:
        feeds["L"] = inputs.lengths
    feeds = {k: v for k, v in feeds.items() if v is not None}
    shapes = {k: tuple(v.shape) for k, v in feeds.items()}
    plan = lower(model, shapes)
    return plan, shapes, feeds


LOWERED_CASES = [
    (RnnCase("LSTM", 5, 3, 7, 9, "bidirectional", initial=True, peepholes=True), True),
    (RnnCase("LSTM", 4, 3, 6, 8, "reverse", lengths=(1, 4, 3), clip=0.9), False),
    (RnnCase("GRU", 5, 3, 7, 9, "bidirectional", initial=True, linear_before_reset=1), True),
    (RnnCase("GRU", 3, 2, 5, 4, "forward", layout=1, initial=True, lengths=(3, 1)), False),
]


@pytest.mark.parametrize("pre_pass", [False, True], ids=["fused", "xw"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize(
    "case, constant_lengths",
    LOWERED_CASES,
    ids=lambda v: case_id(v) if isinstance(v, RnnCase) else str(v),
)
def test_lowered_layer_runs_the_persistent_kernel(
    shim_cache, case, constant_lengths, dtype, pre_pass
) -> None:
    inputs = make_inputs(case).astype(dtype)
    suffix = "f32" if dtype == np.float32 else "f16"
    tactic = f"{case.op.lower()}_persistent{'_xw' if pre_pass else ''}_{suffix}"
    plan, shapes, feeds = built_plan(case, inputs, tactic, constant_lengths)
    layer = plan.layers[0]
    check = next(t for t in lower_rnn.TACTICS if t.name == tactic).check
    assert check is not None and check(layer, plan) is None
    layer.tactic = tactic
    memory = plan_memory(plan, BuilderConfig(), shapes)
    launch_plan = lower_launch_plan(plan, memory, shapes, lower_rnn.LOWERINGS)
    entries = [s.entry for s in launch_plan.steps]
    rnn_entry = f"gie_{case.op.lower()}_persistent_{suffix}"
    assert entries == ([f"gie_gemm_simt_{suffix}"] if pre_pass else []) + [rnn_entry]
    launch = launch_plan.steps[-1]
    assert launch.grid == (case.batch, case.dirs, 1) and launch.block == (32, 1, 1)
    got = execute_on_shim(launch_plan, feeds, shim_cache)
    want = reference(case, inputs.astype(np.float32))
    names = ["Y", "Y_h", "Y_c"][: len(want)]
    tolerance = (1e-4, 1e-5) if dtype == np.float32 else (1e-2, 1e-2)
    assert_outputs([got[n] for n in names], want, *tolerance)


def test_checks_refuse_what_the_kernel_does_not_do() -> None:
    case = RnnCase("GRU", 3, 2, 5, 4)
    inputs = make_inputs(case)
    plan, _, _ = built_plan(case, inputs, "gru_persistent_f32")
    layer = plan.layers[0]
    fused, pre_pass = lower_rnn.rnn_check(False), lower_rnn.rnn_check(True)
    assert fused(layer, plan) is None and pre_pass(layer, plan) is None
    odd = replace_attrs(layer, activations=["Sigmoid", "Relu"])
    assert "default activations" in (fused(odd, plan) or "")
    fine = replace_attrs(layer, activations=["Sigmoid", "Tanh"])
    assert fused(fine, plan) is None
    r_spec = plan.specs["R"]
    plan.specs["R"] = TensorSpec((1, 3 * 1100, 1100), r_spec.dtype)
    assert "hidden size 1100" in (fused(layer, plan) or "")
    plan.specs["R"] = r_spec
    del plan.constants["W"]
    assert "constant W" in (pre_pass(layer, plan) or "")
    names = {t.name for t in lower_rnn.TACTICS}
    assert names == set(lower_rnn.LOWERINGS) and len(names) == 8
    assert lower_rnn.block_threads(9) == 32 and lower_rnn.block_threads(1024) == 512


def replace_attrs(layer, **attrs):
    values = {name: layer.attrs.get(name) for name in layer.attrs.names()}
    values.update(attrs)
    return dataclasses.replace(layer, attrs=Attrs(values))

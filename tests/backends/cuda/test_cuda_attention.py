"""Fused attention (kernels/attention.cu) on the CPU shim vs the gie::Attention reference.

Q, K, V are [batch, seq, heads * head_dim]; the kernels stream 32-key K/V tiles with an online
softmax. Shapes are tiny and not multiples of the tiles (16 query rows per SIMT block, 64 per
mma block, 32 keys per tile), with 1 to 3 heads, head_dim 8/16/24 (and 40, 64), seq_q != seq_k,
head_dim_v != head_dim, K/V batch broadcast, every mask shape the zoo and the reference allow
([B,1,1,Sk] from BERT, [B,1,Sq,Sk], [Sq,Sk], [B,H,Sq,Sk], [Sk]) and causal. fp32 matches at
rtol 1e-4 / atol 1e-5, fp16 within 1e-2. The file compiles for sm_80 and sm_90 with no spills,
also at other -D tile sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from engine.backends.cuda import lower_attention, nvrtc, shim_runner
from engine.backends.cuda.executor import CudaRunner
from engine.backends.cuda.lowering import lower_launch_plan
from engine.backends.cuda.nvrtc import KERNEL_DIR
from engine.backends.cuda.shim_device import ShimDevice
from engine.build.memory import plan_memory
from engine.build.plan import lower
from engine.config import BuilderConfig, Precision
from engine.ops.registry import GIE_DOMAIN, Attrs, KernelContext, TensorSpec, default_registry

REGISTRY = default_registry()
CONTEXT = KernelContext(opset=19)
RNG = np.random.default_rng(23)
FILE = "attention.cu"
pytestmark = pytest.mark.xdist_group("cuda-shim")


@dataclass(frozen=True)
class Case:
    """One gie::Attention: batch, heads, seq_q, seq_k, head_dim, head_dim_v, the mask shape
    (None: no mask; "B"/"H"/"Q"/"K" stand for batch, heads, seq_q, seq_k), causal, an
    explicit scale, and the batch of K and V (1: broadcast over Q's batch)."""

    batch: int
    heads: int
    seq_q: int
    seq_k: int
    head_dim: int
    head_dim_v: int | None = None
    mask: str | None = None
    causal: int = 0
    scale: float | None = None
    kv_batch: int | None = None

    def mask_shape(self) -> tuple[int, ...]:
        sizes = {"B": self.batch, "H": self.heads, "Q": self.seq_q, "K": self.seq_k, "1": 1}
        return tuple(sizes[c] for c in self.mask or "")


CASES = [
    Case(1, 1, 5, 7, 8),
    Case(2, 2, 17, 33, 16, mask="B11K"),  # BERT's extended mask, 2 query tiles, 2 key tiles
    Case(1, 3, 20, 9, 24, mask="B1QK"),
    Case(2, 1, 9, 40, 8, mask="QK"),
    Case(1, 2, 6, 6, 16, head_dim_v=8, mask="BHQK", scale=0.3),
    Case(2, 3, 7, 11, 8, mask="K", kv_batch=1),
    Case(1, 2, 19, 19, 8, causal=1),  # square causal, 2 query tiles
    Case(1, 1, 5, 37, 24, head_dim_v=40, causal=1, mask="11QK"),  # causal with seq_k > seq_q
    Case(1, 1, 64, 70, 64),  # head_dim past one 32-lane pass, 3 key tiles
]


def reference(case: Case, inputs: list[np.ndarray | None]) -> np.ndarray:
    spec = REGISTRY.lookup("Attention", GIE_DOMAIN)
    assert spec is not None
    attributes: dict = {"num_heads": case.heads, "causal": case.causal}
    if case.scale is not None:
        attributes["scale"] = case.scale
    present = inputs if inputs[3] is not None else inputs[:3]
    return np.asarray(spec.kernel(present, Attrs(attributes), CONTEXT)[0])


def make_inputs(case: Case, dtype: type) -> list[np.ndarray | None]:
    dv = case.head_dim_v or case.head_dim
    kv = case.kv_batch or case.batch
    q = RNG.standard_normal((case.batch, case.seq_q, case.heads * case.head_dim))
    k = RNG.standard_normal((kv, case.seq_k, case.heads * case.head_dim))
    v = RNG.standard_normal((kv, case.seq_k, case.heads * dv))
    mask = None
    if case.mask is not None:
        # A BERT-like mask: 0 or a large negative value, plus a small ramp (every entry used).
        shape = case.mask_shape()
        keep = RNG.random(shape) > 0.3
        mask = np.where(keep, RNG.standard_normal(shape), -1e4)
        if case.mask == "B11K":
            mask[..., 0] = 0.0  # every row keeps one key
    return [None if x is None else np.ascontiguousarray(x.astype(dtype)) for x in (q, k, v, mask)]


def mask_strides(shape: tuple[int, ...], case: Case) -> list[int]:
    full = (case.batch, case.heads, case.seq_q, case.seq_k)
    return list(lower_attention.mask_strides(shape, full))


def run(
    lib: shim_runner.ShimLibrary,
    case: Case,
    inputs: list,
    entry: str,
    rows_per_block: int,
    threads: int,
) -> np.ndarray:
    q, k, v, mask = inputs
    dv = case.head_dim_v or case.head_dim
    hidden, hidden_v = case.heads * case.head_dim, case.heads * dv
    out = np.full((case.batch, case.seq_q, hidden_v), 7.0, q.dtype)
    kv_stride = 0 if k.shape[0] == 1 and case.batch > 1 else case.seq_k
    scale = case.scale if case.scale is not None else 1.0 / math.sqrt(case.head_dim)
    args = [q, k, v, mask, out, case.seq_q, case.seq_k, case.head_dim, dv]
    args += [case.seq_q * hidden, hidden, kv_stride * hidden, hidden]
    args += [kv_stride * hidden_v, hidden_v, case.seq_q * hidden_v, hidden_v]
    args += mask_strides(mask.shape, case) if mask is not None else [0, 0, 0, 0]
    args += [scale, case.causal]
    grid = (-(-case.seq_q // rows_per_block), case.heads, case.batch)
    lib.launch(entry, grid, threads, args)
    return out


@pytest.fixture(scope="module")
def lib(shim_cache: Path) -> shim_runner.ShimLibrary:
    return shim_runner.build_file(KERNEL_DIR / FILE, shim_cache)


def test_mask_strides_broadcast_like_numpy() -> None:
    full = (2, 3, 5, 7)
    assert lower_attention.mask_strides((2, 1, 1, 7), full) == (7, 0, 0, 1)
    assert lower_attention.mask_strides((2, 1, 5, 7), full) == (35, 0, 7, 1)
    assert lower_attention.mask_strides((5, 7), full) == (0, 0, 7, 1)
    assert lower_attention.mask_strides((2, 3, 5, 7), full) == (105, 35, 7, 1)
    assert lower_attention.mask_strides((7,), full) == (0, 0, 0, 1)
    assert lower_attention.mask_strides((1, 1), full) == (0, 0, 0, 0)
    for bad in ((3, 1, 1, 7), (5, 6), (1, 2, 3, 5, 7)):
        with pytest.raises(ValueError):
            lower_attention.mask_strides(bad, full)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_attention_f32_matches_reference(lib, case: Case) -> None:
    inputs = make_inputs(case, np.float32)
    expected = reference(case, inputs)
    out = run(lib, case, inputs, "gie_attention_f32", 16, 128)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES[1:8:2], ids=str)
def test_attention_f16_matches_reference(lib, case: Case) -> None:
    inputs = make_inputs(case, np.float16)
    expected = reference(case, inputs).astype(np.float32)
    out = run(lib, case, inputs, "gie_attention_f16", 16, 128)
    np.testing.assert_allclose(out.astype(np.float32), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_attention_mma_f16_matches_reference(lib, case: Case) -> None:
    """The tensor-core entry: 64 query rows per block (16 per warp), P rounded to fp16."""
    inputs = make_inputs(case, np.float16)
    expected = reference(case, inputs).astype(np.float32)
    out = run(lib, case, inputs, "gie_attention_mma_f16", 64, 128)
    np.testing.assert_allclose(out.astype(np.float32), expected, rtol=1e-2, atol=1e-2)


def test_attention_mma_f16_with_two_warps_and_head_dim_64(shim_cache: Path) -> None:
    """-D GIE_ATTN_MMA_WARPS=2 (32-row blocks), GIE_ATTN_MAX_D=64 at its limit, 3 query tiles."""
    source = "#define GIE_ATTN_MMA_WARPS 2\n#define GIE_ATTN_MAX_D 64\n"
    source += (KERNEL_DIR / FILE).read_text()
    small = shim_runner.build(source, "attention_mma_small.cu", shim_cache)
    case = Case(1, 2, 70, 45, 64, head_dim_v=40, mask="B1QK", causal=1)
    inputs = make_inputs(case, np.float16)
    out = run(small, case, inputs, "gie_attention_mma_f16", 32, 64)
    expected = reference(case, inputs).astype(np.float32)
    np.testing.assert_allclose(out.astype(np.float32), expected, rtol=1e-2, atol=1e-2)


def test_rows_with_no_allowed_key_are_nan_like_the_reference(lib) -> None:
    """Causal with seq_q > seq_k: the first seq_q - seq_k rows see no key (softmax of all -inf
    is NaN in the reference); the others match."""
    case = Case(1, 2, 9, 4, 8, causal=1)
    inputs = make_inputs(case, np.float32)
    expected = reference(case, inputs)
    assert np.isnan(expected[0, :5]).all() and not np.isnan(expected[0, 5:]).any()
    out = run(lib, case, inputs, "gie_attention_f32", 16, 128)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)  # NaNs compare equal
    half = [x.astype(np.float16) for x in inputs[:3]] + [None]
    out = run(lib, case, half, "gie_attention_mma_f16", 64, 128).astype(np.float32)
    np.testing.assert_allclose(out, reference(case, half), rtol=1e-2, atol=1e-2)


def test_packed_qkv_strides(lib) -> None:
    """Q, K and V as column slices of one [B, S, 3 * hidden] tensor (row stride 3 * hidden)."""
    case = Case(2, 2, 10, 10, 8, mask="B11K")
    qkv = RNG.standard_normal((2, 10, 48)).astype(np.float32)
    q, k, v = (np.ascontiguousarray(qkv[..., 16 * i : 16 * (i + 1)]) for i in range(3))
    mask = make_inputs(case, np.float32)[3]
    expected = reference(case, [q, k, v, mask])
    out = np.zeros((2, 10, 16), np.float32)
    flat = qkv.reshape(-1)  # 1-D views of one buffer: K and V pointers offset by 16 and 32
    args = [flat, flat[16:], flat[32:], mask, out, 10, 10, 8, 8]
    args += [480, 48, 480, 48, 480, 48, 160, 16, *mask_strides(mask.shape, case)]
    args += [1 / math.sqrt(8), 0]
    lib.launch("gie_attention_f32", (1, 2, 2), 128, args)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_other_tile_sizes(shim_cache: Path) -> None:
    """-D GIE_ATTN_WARPS=2, ROWS=3 (6-row blocks), MAX_D=64."""
    source = "#define GIE_ATTN_WARPS 2\n#define GIE_ATTN_ROWS 3\n#define GIE_ATTN_MAX_D 64\n"
    source += (KERNEL_DIR / FILE).read_text()
    small = shim_runner.build(source, "attention_small_tiles.cu", shim_cache)
    for case in (Case(2, 2, 13, 35, 24, mask="B1QK"), Case(1, 1, 8, 8, 64, causal=1)):
        inputs = make_inputs(case, np.float32)
        out = run(small, case, inputs, "gie_attention_f32", 6, 64)
        np.testing.assert_allclose(out, reference(case, inputs), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- lowering


def attention_model(case: Case, inputs: list, constant_mask: bool) -> ir.Model:
    """One gie::Attention node: Q, K, V (and the mask unless ``constant_mask``) as graph
    inputs, the mask as an initializer otherwise."""
    elem = helper.np_dtype_to_tensor_dtype(inputs[0].dtype)
    names = ["Q", "K", "V"] + (["M"] if inputs[3] is not None else [])
    feeds = [n for n in names if not (n == "M" and constant_mask)]
    graph_inputs = [
        helper.make_tensor_value_info(n, elem, list(inputs[names.index(n)].shape)) for n in feeds
    ]
    initializers = [numpy_helper.from_array(inputs[3], "M")] if constant_mask else []
    attributes: dict = {"num_heads": case.heads, "causal": case.causal}
    if case.scale is not None:
        attributes["scale"] = case.scale
    node = helper.make_node("Attention", names, ["Y"], name="att", domain=GIE_DOMAIN, **attributes)
    graph = helper.make_graph(
        [node], "att", graph_inputs, [helper.make_tensor_value_info("Y", elem, None)], initializers
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(GIE_DOMAIN, 1)]
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets))


LOWERED = [
    (Case(2, 2, 17, 33, 16, mask="B11K"), False, "attention_simt_f32"),
    (Case(1, 3, 20, 9, 24, mask="QK", scale=0.2), True, "attention_simt_f32_d64"),
    (Case(2, 2, 9, 12, 8, head_dim_v=16, mask="B1QK", causal=1, kv_batch=1), False,
     "attention_simt_f16"),
    (Case(1, 2, 19, 40, 24, mask="B11K"), True, "attention_mma_f16"),
    (Case(2, 1, 7, 7, 16, causal=1), False, "attention_mma_f16_d64"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "constant_mask", "tactic"), LOWERED, ids=str)
def test_lowered_layer_runs_the_fused_kernel(shim_cache, case, constant_mask, tactic) -> None:
    dtype = np.float16 if "f16" in tactic else np.float32
    inputs = make_inputs(case, dtype)
    model = attention_model(case, inputs, constant_mask)
    feeds = {n: x for n, x in zip("QKVM", inputs) if x is not None}
    if constant_mask:
        del feeds["M"]
    shapes = {k: tuple(v.shape) for k, v in feeds.items()}
    plan = lower(model, shapes)
    layer = plan.layers[0]
    if dtype == np.float16:
        layer.precision = Precision.FP16
    found = next(t for t in lower_attention.TACTICS if t.name == tactic)
    assert found.check is not None and found.check(layer, plan) is None
    layer.tactic = tactic
    memory = plan_memory(plan, BuilderConfig(), shapes)
    launch_plan = lower_launch_plan(plan, memory, shapes, lower_attention.LOWERINGS)
    (launch,) = launch_plan.steps
    rows = 64 if "mma" in tactic else 16
    assert launch.entry == found.entry and launch.source.defines == found.defines
    assert launch.grid == (-(-case.seq_q // rows), case.heads, case.batch)
    assert launch.block == (128, 1, 1)
    got = CudaRunner(launch_plan, ShimDevice(shim_cache)).run(feeds)["Y"]
    want = reference(case, inputs)
    tolerance = (1e-4, 1e-5) if dtype == np.float32 else (1e-2, 1e-2)
    np.testing.assert_allclose(
        got.astype(np.float32), want.astype(np.float32), rtol=tolerance[0], atol=tolerance[1]
    )


def test_checks_refuse_what_the_kernels_do_not_do() -> None:
    case = Case(1, 2, 5, 6, 48, mask="B11K")
    inputs = make_inputs(case, np.float32)
    plan = lower(attention_model(case, inputs, False), {})
    layer = plan.layers[0]
    wide, narrow = lower_attention.attention_check(128), lower_attention.attention_check(64)
    assert wide(layer, plan) is None and narrow(layer, plan) is None
    v_spec = plan.specs["V"]
    plan.specs["V"] = TensorSpec((1, 6, 2 * 80), v_spec.dtype)
    assert "up to 64" in (narrow(layer, plan) or "") and wide(layer, plan) is None
    plan.specs["V"] = TensorSpec((1, 6, 2 * 130), v_spec.dtype)
    assert "up to 128" in (wide(layer, plan) or "")
    plan.specs["V"] = TensorSpec((1, 6, 95), v_spec.dtype)
    assert "do not split into 2 heads" in (wide(layer, plan) or "")
    plan.specs["V"] = v_spec
    m_spec = plan.specs["M"]
    plan.specs["M"] = TensorSpec(m_spec.shape, ir.DataType.FLOAT16)
    assert "one storage type" in (wide(layer, plan) or "")
    plan.specs["M"] = TensorSpec((1, 1, 1, 1, 6), m_spec.dtype)
    assert "more than 4 dimensions" in (wide(layer, plan) or "")
    plan.specs["M"] = m_spec
    names = {t.name for t in lower_attention.TACTICS}
    assert names == set(lower_attention.LOWERINGS) and len(names) == 6
    assert all(t.kernel_file == FILE and t.family == "attention" for t in lower_attention.TACTICS)


# --------------------------------------------------------------------------- compile check

VARIANTS = [
    (),
    ("-DGIE_ATTN_MAX_D=64",),
    ("-DGIE_ATTN_WARPS=8", "-DGIE_ATTN_ROWS=2"),
    ("-DGIE_ATTN_MMA_WARPS=2",),
]


@pytest.mark.xdist_group("cuda-nvrtc")
@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: " ".join(o) or "default")
def test_compiles_for_sm80_and_sm90_without_spills(nvrtc_cache, options) -> None:
    source = (KERNEL_DIR / FILE).read_text()
    for arch in nvrtc.DEFAULT_ARCHS:
        result = nvrtc.compile_source(source, FILE, arch, extra_options=options, cache=nvrtc_cache)
        assert set(result.resources) >= {"gie_attention_f32", "gie_attention_f16"}
        for entry, used in result.resources.items():
            assert not used.spills and not used.stack_bytes, f"{arch} {entry} {options}: {used}"
            assert 0 < used.registers <= 255, f"{arch} {entry}: {used.registers}"
            assert used.shared_bytes <= 48 * 1024, f"{arch} {entry}: {used.shared_bytes}"
        assert "gie_attention_mma_f16" in result.resources
        ptx = nvrtc.compile_source(source, FILE, arch, "ptx", options, cache=nvrtc_cache)
        assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx.binary.decode()
        assert "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16" in ptx.binary.decode()

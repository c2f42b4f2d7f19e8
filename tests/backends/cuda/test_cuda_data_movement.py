"""Data-movement kernels (data_movement.cu, resize.cu) on the CPU shim vs the NumPy reference.

Transpose, Slice, Concat and Gather run through the width-generic entries (_b1/_b2/_b4/_b8) on
random BITS (every float pattern, NaN payloads included) with the arguments computed by the
same helpers the lowering uses (engine.backends.cuda.lower_data_movement), and must equal the
reference bit for bit. Resize (NCHW and NHWC, fp32 / fp16) is compared at rtol 1e-5 / 1e-2,
nearest mode exactly. im2col is compared with a NumPy im2col, bit for bit, and its product with
the KRSC weight with the Conv reference. Shapes are tiny and odd, grids of 2 blocks x 64
threads so the grid-stride loops run several times. Both files also compile for sm_80 and
sm_90 without local-memory spills.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from engine.backends.cuda import lower_data_movement as dm
from engine.backends.cuda import lower_misc, nvrtc, shim_runner
from engine.backends.cuda import lower_resize as rs
from engine.backends.cuda.executor import CudaRunner
from engine.backends.cuda.launch_plan import KernelLaunch, KernelSource
from engine.backends.cuda.lowering import lower_launch_plan
from engine.backends.cuda.nvrtc import KERNEL_DIR
from engine.backends.cuda.shim_device import ShimDevice
from engine.build.memory import plan_memory
from engine.build.plan import lower
from engine.config import BuilderConfig
from engine.ops.registry import Attrs, KernelContext, default_registry

REGISTRY = default_registry()
CONTEXT = KernelContext(opset=19)
RNG = np.random.default_rng(5)
GRID, BLOCK = (2,), (64,)
pytestmark = pytest.mark.xdist_group("cuda-shim")

#: dtype -> (entry suffix, unsigned view dtype), one per element width.
DTYPES = {
    np.int8: "b1",
    np.float16: "b2",
    np.float32: "b4",
    np.int64: "b8",
}


def reference(op_type: str, inputs: list, attributes: dict, opset: int = 19) -> np.ndarray:
    spec = REGISTRY.lookup(op_type, "")
    assert spec is not None, op_type
    return np.asarray(spec.kernel(inputs, Attrs(attributes), KernelContext(opset=opset))[0])


@pytest.fixture(scope="module")
def movement(shim_cache: Path) -> shim_runner.ShimLibrary:
    return shim_runner.build_file(KERNEL_DIR / "data_movement.cu", shim_cache)


@pytest.fixture(scope="module")
def resize(shim_cache: Path) -> shim_runner.ShimLibrary:
    return shim_runner.build_file(KERNEL_DIR / "resize.cu", shim_cache)


def random_bits(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """Random bytes seen as ``dtype`` (floats include NaNs and infinities)."""
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return RNG.integers(0, 256, size, dtype=np.uint8).view(dtype).reshape(shape)


def bits(array: np.ndarray) -> np.ndarray:
    """The same bytes as the unsigned integer of the element width (what the kernels take)."""
    array = np.ascontiguousarray(array)
    return array.view(f"uint{8 * array.dtype.itemsize}")


def assert_same_bits(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(bits(got), bits(want))


# --------------------------------------------------------------------------- transpose


TRANSPOSES = [
    ((7,), None),
    ((5, 3), None),
    ((2, 3, 5), (0, 2, 1)),
    ((3, 1, 4, 5), (0, 2, 3, 1)),  # NCHW -> NHWC with a dim of 1
    ((2, 3, 4, 5), (3, 1, 0, 2)),
    ((2, 3, 2, 3, 2), (4, 2, 0, 3, 1)),
    ((2, 1, 3, 2, 2, 3), (5, 4, 3, 2, 1, 0)),
    ((2, 2, 3, 2, 2, 3, 2), (0, 1, 3, 2, 4, 6, 5)),  # rank 7, rank 5 after merging
]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("shape", "perm"), TRANSPOSES)
def test_transpose_is_the_reference_bit_for_bit(movement, shape, perm, dtype) -> None:
    x = random_bits(shape, dtype)
    attributes = {} if perm is None else {"perm": list(perm)}
    want = reference("Transpose", [x], attributes)
    arguments = dm.transpose_arguments(shape, perm)
    assert arguments is not None
    n, dims, strides = arguments
    y = np.zeros_like(bits(want))
    movement.launch(f"gie_transpose_{DTYPES[dtype]}", GRID, BLOCK, (bits(x), y, n, *dims, *strides))
    assert_same_bits(y.view(dtype).reshape(want.shape), want)


def test_rank_beyond_six_after_merging_is_refused() -> None:
    shape = (2, 3, 2, 3, 2, 3, 2)
    assert dm.transpose_arguments(shape, (6, 5, 4, 3, 2, 1, 0)) is None
    assert dm.transpose_arguments(shape, tuple(range(7))) is not None  # one contiguous axis


# --------------------------------------------------------------------------- slice


SLICES = [
    # shape, starts, ends, axes, steps
    ((9,), [1], [8], [0], [2]),
    ((9,), [-1], [-100], [0], [-1]),  # the whole axis reversed
    ((6, 7), [5, 1], [0, 100], [0, 1], [-2, 3]),
    ((4, 5, 6), [-3], [2**62], [2], [1]),  # end clamped
    ((4, 5, 6), [3, 4], [-5, -6], [0, 1], [-1, -2]),
    ((2, 3, 4, 5), [0, 1, 3], [2, 3, 0], [1, 3, 2], [1, 1, -1]),
    ((2, 3, 2, 3, 2, 3), [1, 2, 0], [2, 0, 3], [0, -1, 3], [1, -1, 2]),
    ((3, 4), [2], [2], [1], [1]),  # empty
]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("shape", "starts", "ends", "axes", "steps"), SLICES)
def test_slice_is_the_reference_bit_for_bit(movement, shape, starts, ends, axes, steps, dtype):
    x = random_bits(shape, dtype)
    arrays = [np.asarray(v, dtype=np.int64) for v in (starts, ends, axes, steps)]
    want = reference("Slice", [x, *arrays], {})
    normalized = [a % len(shape) for a in axes]
    arguments = dm.slice_arguments(shape, starts, ends, normalized, steps)
    assert arguments is not None
    n, offset, dims, strides = arguments
    assert n == want.size
    y = np.zeros_like(bits(want)).reshape(-1)
    if n:
        args = (bits(x), y, n, offset, *dims, *strides)
        movement.launch(f"gie_slice_{DTYPES[dtype]}", GRID, BLOCK, args)
    assert_same_bits(y.view(dtype).reshape(want.shape), want)


def test_slice_with_zero_strides_is_a_broadcast(movement) -> None:
    """The strided copy is also Expand: stride 0 along the broadcast axes."""
    x = np.arange(5, dtype=np.float32)
    y = np.zeros(3 * 5, dtype=np.uint32)
    movement.launch(
        "gie_slice_b4", GRID, BLOCK, (bits(x), y, 15, 0, 1, 1, 1, 3, 5, 0, 0, 0, 0, 0, 1)
    )
    np.testing.assert_array_equal(y.view(np.float32).reshape(3, 5), np.broadcast_to(x, (3, 5)))


# --------------------------------------------------------------------------- concat


CONCATS = [
    ([(3,), (1,), (5,)], 0),
    ([(2, 3), (4, 3)], 0),
    ([(2, 3, 4), (2, 1, 4), (2, 5, 4)], 1),
    ([(2, 3, 4), (2, 3, 1), (2, 3, 2)], -1),
    ([(1, 2, 3, 3), (1, 5, 3, 3), (1, 1, 3, 3)], 1),
    ([(2, 0, 3), (2, 2, 3)], 1),  # an empty input
]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("shapes", "axis"), CONCATS)
def test_concat_is_the_reference_bit_for_bit(movement, shapes, axis, dtype) -> None:
    xs = [random_bits(shape, dtype) for shape in shapes]
    want = reference("Concat", xs, {"axis": axis})
    y = np.zeros_like(bits(want)).reshape(-1)
    for x, (outer, slab, row, offset) in zip(xs, dm.concat_arguments(shapes, axis)):
        if outer * slab:
            args = (bits(x), y, outer, slab, row, offset)
            movement.launch(f"gie_concat_{DTYPES[dtype]}", GRID, BLOCK, args)
    assert_same_bits(y.view(dtype).reshape(want.shape), want)


def test_concat_of_nhwc_storage_along_channels(movement) -> None:
    """What lower_concat does for NHWC-stored inputs: channel slabs of the NHWC output."""
    xs = [random_bits((2, c, 3, 2), np.float32) for c in (3, 1, 4)]
    want = reference("Concat", xs, {"axis": 1})
    stored = [(2, 3, 2, x.shape[1]) for x in xs]
    y = np.zeros(want.size, dtype=np.uint32)
    for x, (outer, slab, row, offset) in zip(xs, dm.concat_arguments(stored, 3)):
        nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        movement.launch("gie_concat_b4", GRID, BLOCK, (bits(nhwc), y, outer, slab, row, offset))
    got = y.view(np.float32).reshape(2, 3, 2, 8).transpose(0, 3, 1, 2)
    assert_same_bits(np.ascontiguousarray(got), want)


# --------------------------------------------------------------------------- gather


GATHERS = [
    ((7,), [3, -1, 0, 6, -7], 0),
    ((5, 4), [[1, -2], [0, 4]], 0),
    ((3, 5, 4), [4, 0, -5, 2], 1),
    ((3, 5, 4), [-1, 3, 3], -1),
    ((2, 3, 4), 2, 1),  # a scalar index drops the axis
    ((4, 3), np.zeros((0,), np.int64), 0),  # no indices
]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("shape", "indices", "axis"), GATHERS)
def test_gather_is_the_reference_bit_for_bit(movement, shape, indices, axis, dtype) -> None:
    x = random_bits(shape, dtype)
    index = np.asarray(indices, dtype=np.int64)
    want = reference("Gather", [x, index], {"axis": axis})
    outer, axis_dim, count, inner = dm.gather_arguments(shape, axis, index.size)
    y = np.zeros_like(bits(want)).reshape(-1)
    if y.size:
        args = (bits(x), np.ascontiguousarray(index.reshape(-1)), y, outer, axis_dim, count, inner)
        movement.launch(f"gie_gather_{DTYPES[dtype]}", GRID, BLOCK, args)
    assert_same_bits(y.view(dtype).reshape(want.shape), want)


def test_gather_clamps_out_of_range_indices_instead_of_reading_outside(movement) -> None:
    x = np.arange(4, dtype=np.float32)
    y = np.zeros(3, dtype=np.uint32)
    index = np.asarray([9, -9, 1], dtype=np.int64)
    movement.launch("gie_gather_b4", GRID, BLOCK, (bits(x), index, y, 1, 4, 3, 1))
    np.testing.assert_array_equal(y.view(np.float32), [3.0, 0.0, 1.0])


# --------------------------------------------------------------------------- resize


def run_resize(
    library: shim_runner.ShimLibrary,
    x: np.ndarray,
    attributes: dict,
    scales: np.ndarray | None,
    sizes: np.ndarray | None,
    nhwc: bool,
) -> np.ndarray:
    """The kernel's NCHW result of Resize(x) (x NCHW; moved to NHWC and back when ``nhwc``)."""
    attrs = Attrs(attributes)
    modes = rs.resize_modes(attrs, 19)
    geometry = rs.resize_geometry(x.shape, scales, sizes, attrs)
    assert not isinstance(modes, str) and not isinstance(geometry, str), (modes, geometry)
    oh, ow, scale_h, scale_w = geometry
    n, c, h, w = x.shape
    suffix = "f32" if x.dtype == np.float32 else "f16"
    source = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if nhwc else x
    y = np.zeros((n, oh, ow, c) if nhwc else (n, c, oh, ow), dtype=x.dtype)
    entry = f"gie_resize_{'nhwc' if nhwc else 'nchw'}_{suffix}"
    args = (source, y, n, c, h, w, oh, ow, scale_h, scale_w, *modes)
    library.launch(entry, GRID, BLOCK, args)
    return np.ascontiguousarray(y.transpose(0, 3, 1, 2)) if nhwc else y


def resize_reference(x, attributes, scales, sizes) -> np.ndarray:
    inputs = [x, np.zeros(0, np.float32), scales, sizes]
    return reference("Resize", inputs, attributes)


COORDINATES = ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"]
NEAREST = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
GEOMETRIES = [
    # scales or sizes for a (1, 2, 5, 7) input
    (np.asarray([1, 1, 2, 3], np.float32), None),
    (np.asarray([1, 1, 0.5, 0.75], np.float32), None),
    (np.asarray([1, 1, 1.5, 1], np.float32), None),
    (None, np.asarray([1, 2, 3, 11], np.int64)),
    (None, np.asarray([1, 2, 8, 1], np.int64)),
]


@pytest.mark.parametrize("geometry", range(len(GEOMETRIES)))
@pytest.mark.parametrize("coordinate", COORDINATES)
@pytest.mark.parametrize("nearest", NEAREST)
def test_resize_nearest_picks_the_reference_pixels(resize, geometry, coordinate, nearest):
    x = RNG.standard_normal((1, 2, 5, 7)).astype(np.float32)
    scales, sizes = GEOMETRIES[geometry]
    attributes = {
        "mode": "nearest",
        "coordinate_transformation_mode": coordinate,
        "nearest_mode": nearest,
    }
    want = resize_reference(x, attributes, scales, sizes)
    got = run_resize(resize, x, attributes, scales, sizes, nhwc=False)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("geometry", range(len(GEOMETRIES)))
@pytest.mark.parametrize("coordinate", COORDINATES)
def test_resize_bilinear_matches_the_reference(resize, geometry, coordinate) -> None:
    x = RNG.standard_normal((1, 2, 5, 7)).astype(np.float32)
    scales, sizes = GEOMETRIES[geometry]
    attributes = {"mode": "linear", "coordinate_transformation_mode": coordinate}
    want = resize_reference(x, attributes, scales, sizes)
    got = run_resize(resize, x, attributes, scales, sizes, nhwc=False)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("nhwc", [False, True])
def test_resize_layouts_and_fp16(resize, dtype, mode, nhwc) -> None:
    x = RNG.standard_normal((2, 3, 4, 3)).astype(dtype)
    scales = np.asarray([1, 1, 1.75, 2.5], np.float32)
    attributes = {"mode": mode, "coordinate_transformation_mode": "half_pixel"}
    want = resize_reference(x, attributes, scales, None)
    got = run_resize(resize, x, attributes, scales, None, nhwc=nhwc)
    assert got.dtype == want.dtype and got.shape == want.shape
    if mode == "nearest":
        np.testing.assert_array_equal(got, want)
    else:
        rtol = 1e-5 if dtype == np.float32 else 1e-2
        np.testing.assert_allclose(
            got.astype(np.float32), want.astype(np.float32), rtol=rtol, atol=rtol
        )


def test_resize_opset10_simple_nearest_and_identity_axis(resize) -> None:
    """Old-opset nearest ('simple': ceil when shrinking) and an unchanged W axis."""
    x = RNG.standard_normal((1, 1, 6, 4)).astype(np.float32)
    scales = np.asarray([1, 1, 0.5, 1], np.float32)
    attrs = Attrs({"mode": "nearest"})
    modes = rs.resize_modes(attrs, 10)
    assert modes == (0, 1, 4)
    geometry = rs.resize_geometry(x.shape, scales, None, attrs)
    assert not isinstance(geometry, str)
    oh, ow, scale_h, scale_w = geometry
    want = reference("Resize", [x, scales], {"mode": "nearest"}, opset=10)
    y = np.zeros((1, 1, oh, ow), np.float32)
    resize.launch(
        "gie_resize_nchw_f32", GRID, BLOCK, (x, y, 1, 1, 6, 4, oh, ow, scale_h, scale_w, *modes)
    )
    np.testing.assert_array_equal(y, want)


def test_resize_refusals() -> None:
    assert isinstance(rs.resize_modes(Attrs({"mode": "cubic"}), 19), str)
    attrs = Attrs({"coordinate_transformation_mode": "tf_crop_and_resize"})
    assert isinstance(rs.resize_modes(attrs, 19), str)
    assert isinstance(rs.resize_modes(Attrs({"mode": "linear", "antialias": 1}), 19), str)
    channels = np.asarray([1, 2, 1, 1], np.float32)
    assert isinstance(rs.resize_geometry((1, 2, 3, 3), channels, None, Attrs({})), str)
    assert isinstance(rs.resize_geometry((2, 3, 3), None, None, Attrs({})), str)


# --------------------------------------------------------------------------- im2col


def numpy_im2col(x, kh, kw, stride, pad, dilation, c_begin, c_count, ld) -> np.ndarray:
    """NHWC x -> [N * OH * OW, ld] rows (n, oh, ow), columns (r, s, c), zero padded."""
    n, h, w, _ = x.shape
    oh = (h + 2 * pad[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * pad[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    padded = np.zeros((n, h + 2 * pad[0], w + 2 * pad[1], c_count), x.dtype)
    padded[:, pad[0] : pad[0] + h, pad[1] : pad[1] + w] = x[..., c_begin : c_begin + c_count]
    col = np.zeros((n, oh, ow, ld), x.dtype)
    k = 0
    for r in range(kh):
        for s in range(kw):
            h0, w0 = r * dilation[0], s * dilation[1]
            window = padded[
                :,
                h0 : h0 + stride[0] * (oh - 1) + 1 : stride[0],
                w0 : w0 + stride[1] * (ow - 1) + 1 : stride[1],
            ]
            col[..., k : k + c_count] = window
            k += c_count
    return col.reshape(n * oh * ow, ld)


IM2COLS = [
    # n, c, h, w, kh, kw, stride, pad, dilation, group (of 2 when c even), extra ld
    (1, 3, 5, 6, 3, 3, (1, 1), (1, 1), (1, 1), None, 0),
    (2, 4, 7, 5, 3, 2, (2, 1), (1, 0), (1, 2), 1, 3),
    (1, 2, 6, 6, 1, 1, (2, 2), (0, 0), (1, 1), None, 5),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", IM2COLS)
def test_im2col_equals_numpy_and_times_the_weight_is_the_conv(movement, case, dtype) -> None:
    n, c, h, w, kh, kw, stride, pad, dilation, group, extra = case
    c_begin, c_count = (0, c) if group is None else (group * (c // 2), c // 2)
    x = RNG.standard_normal((n, c, h, w)).astype(dtype)
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    k = kh * kw * c_count
    ld = k + extra
    want = numpy_im2col(nhwc, kh, kw, stride, pad, dilation, c_begin, c_count, ld)
    oh = (h + 2 * pad[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * pad[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    col = np.full(want.shape, 7, dtype)  # every element is written, padding columns too
    suffix = "f32" if dtype == np.float32 else "f16"
    args = (nhwc, col, n, h, w, c, kh, kw, oh, ow, *stride, *pad, *dilation, c_begin, c_count, ld)
    movement.launch(f"gie_im2col_nhwc_{suffix}", GRID, BLOCK, args)
    np.testing.assert_array_equal(col, want)
    # col @ W^T (W as KRSC) is the convolution of the channel window.
    m = 3
    weight = RNG.standard_normal((m, c_count, kh, kw)).astype(np.float32)
    krsc = weight.transpose(0, 2, 3, 1).reshape(m, k)
    got = col[:, :k].astype(np.float32) @ krsc.T
    attributes = {
        "kernel_shape": [kh, kw],
        "strides": list(stride),
        "pads": [pad[0], pad[1], pad[0], pad[1]],
        "dilations": list(dilation),
    }
    window = x[:, c_begin : c_begin + c_count].astype(np.float32)
    conv = reference("Conv", [window, weight], attributes)
    np.testing.assert_allclose(
        got.reshape(n, oh, ow, m).transpose(0, 3, 1, 2), conv, rtol=1e-4, atol=1e-4
    )


# --------------------------------------------------------------------------- compile check


@pytest.mark.xdist_group("cuda-nvrtc")
def test_kernels_compile_for_sm80_and_sm90_without_spills(nvrtc_cache) -> None:
    entries = 0
    for name in ("data_movement.cu", "resize.cu"):
        for arch in nvrtc.DEFAULT_ARCHS:
            result = nvrtc.compile_file(KERNEL_DIR / name, arch, cache=nvrtc_cache)
            assert result.resources, name
            for entry, used in result.resources.items():
                assert not used.spills, f"{name} {arch} {entry} spills: {used}"
                assert 0 < used.registers <= 64, f"{name} {arch} {entry}: {used.registers}"
                entries += 1
    assert entries == 2 * (18 + 4)


def test_tactics_and_lowerings_cover_every_width() -> None:
    names = {t.name for t in dm.TACTICS + rs.TACTICS}
    assert names == set(dm.LOWERINGS) | set(rs.LOWERINGS)
    for kind in ("transpose", "slice", "concat", "gather"):
        for suffix in ("b1", "b2", "b4", "b8"):
            tactic = next(t for t in dm.TACTICS if t.name == f"{kind}_{suffix}")
            assert tactic.entry == f"gie_{kind}_{suffix}"
            source = KernelSource(file=tactic.kernel_file)
            const = source.const_pointers(tactic.entry)  # what the lowering reads
            assert const[:2] == [True, kind == "gather"], (tactic.entry, const)
    for tactic in (t for t in rs.TACTICS if t.name.startswith("resize")):
        assert KernelSource(file=tactic.kernel_file).const_pointers(tactic.entry)[:2] == [
            True,
            False,
        ]


# --------------------------------------------------------------------------- lowering


def movement_model(dtype: type) -> ir.Model:
    """X [1, 3, 5, 6] -> Transpose -> Slice (negative step), Gather + Concat, Resize (linear
    and nearest by sizes); every result a graph output."""
    from onnx import helper, numpy_helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    constants = {
        "starts": np.asarray([4, 1], np.int64),
        "ends": np.asarray([0, 6], np.int64),
        "axes": np.asarray([1, 2], np.int64),
        "steps": np.asarray([-2, 2], np.int64),
        "index": np.asarray([[2, -1], [0, 0]], np.int64),
        "scales": np.asarray([1, 1, 2, 1.5], np.float32),
        "sizes": np.asarray([1, 3, 3, 11], np.int64),
        "roi": np.zeros(0, np.float32),
    }
    nodes = [
        helper.make_node("Transpose", ["X"], ["T"], perm=[0, 2, 3, 1]),
        helper.make_node("Slice", ["T", "starts", "ends", "axes", "steps"], ["S"]),
        helper.make_node("Gather", ["X", "index"], ["G"], axis=3),
        helper.make_node("Reshape", ["G", "shape"], ["G2"]),
        helper.make_node("Concat", ["G2", "X"], ["C"], axis=-1),
        helper.make_node("Resize", ["X", "roi", "scales"], ["R"], mode="linear"),
        helper.make_node(
            "Resize",
            ["X", "roi", "", "sizes"],
            ["RN"],
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="ceil",
        ),
    ]
    constants["shape"] = np.asarray([1, 3, 5, 4], np.int64)
    initializers = [numpy_helper.from_array(v, k) for k, v in constants.items()]
    outputs = [helper.make_tensor_value_info(n, elem, None) for n in ("S", "G", "C", "R", "RN")]
    graph = helper.make_graph(
        nodes,
        "movement",
        [helper.make_tensor_value_info("X", elem, [1, 3, 5, 6])],
        outputs,
        initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_lowered_layers_run_the_kernels(shim_cache, dtype) -> None:
    model = movement_model(dtype)
    x = RNG.standard_normal((1, 3, 5, 6)).astype(dtype)  # finite: Resize interpolates
    shapes = {"X": (1, 3, 5, 6)}
    plan = lower(model, shapes)
    lowerings = {**dm.LOWERINGS, **rs.LOWERINGS}
    lowerings.update(lower_misc.LOWERINGS)  # the Reshape copy
    chosen = {}
    for layer in plan.layers:
        for tactic in dm.TACTICS + rs.TACTICS + lower_misc.TACTICS:
            dtypes_ok = plan.specs[layer.inputs[0]].dtype in tactic.dtypes
            if layer.qualified_op in tactic.ops and dtypes_ok:
                assert tactic.check is None or tactic.check(layer, plan) is None, tactic.name
                layer.tactic = chosen[layer.name] = tactic.name
                break
    suffix, resize_suffix = DTYPES[dtype], "f32" if dtype == np.float32 else "f16"
    assert sorted(chosen.values()) == sorted(
        [
            f"transpose_{suffix}",
            f"slice_{suffix}",
            f"gather_{suffix}",
            f"concat_{suffix}",
            f"resize_{resize_suffix}",
            f"resize_{resize_suffix}",
            "reshape_copy",
        ]
    ), chosen
    memory = plan_memory(plan, BuilderConfig(), shapes)
    launch_plan = lower_launch_plan(plan, memory, shapes, lowerings)
    assert not launch_plan.host_layers, launch_plan.notes
    entries = sorted(s.entry for s in launch_plan.steps if isinstance(s, KernelLaunch))
    resize_entry = f"gie_resize_nchw_{resize_suffix}"
    assert entries == sorted(
        [
            f"gie_transpose_{suffix}",
            f"gie_slice_{suffix}",
            f"gie_gather_{suffix}",
            f"gie_concat_{suffix}",
            f"gie_concat_{suffix}",
            resize_entry,
            resize_entry,
        ]
    )
    runner = CudaRunner(launch_plan, ShimDevice(shim_cache), use_graph=False)
    got = runner.run({"X": x})
    runner.close()
    t = x.transpose(0, 2, 3, 1)
    g = np.take(x, [[2, 5], [0, 0]], axis=3)
    want = {
        "S": t[:, 4:0:-2, 1:6:2],
        "G": g,
        "C": np.concatenate([g.reshape(1, 3, 5, 4), x], axis=-1),
    }
    for name, value in want.items():
        assert_same_bits(got[name], np.ascontiguousarray(value))
    resized = reference(
        "Resize",
        [x, np.zeros(0, np.float32), np.asarray([1, 1, 2, 1.5], np.float32)],
        {"mode": "linear"},
    )
    rtol = 1e-5 if dtype == np.float32 else 1e-2
    np.testing.assert_allclose(got["R"].astype(np.float32), resized.astype(np.float32), rtol, rtol)
    nearest = reference(
        "Resize",
        [x, np.zeros(0, np.float32), None, np.asarray([1, 3, 3, 11], np.int64)],
        {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "ceil"},
    )
    assert_same_bits(got["RN"], nearest)


def test_concat_and_resize_stay_in_nhwc_after_a_convolution(shim_cache) -> None:
    """Conv (NHWC kernels) -> Concat along C and Resize read the NHWC storage directly: no
    layout conversion between them, only the graph outputs go back to plain."""
    from onnx import TensorProto, helper, numpy_helper

    from engine.backends.cuda import lower_conv

    weight = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["Y"], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["Y", "Y"], ["C"], axis=1),
        helper.make_node("Resize", ["C", "", "scales"], ["R"], mode="nearest"),
        helper.make_node("Transpose", ["Y"], ["T"], perm=[0, 2, 1, 3]),
        helper.make_node("Slice", ["Y", "starts", "ends", "axes", "steps"], ["S"]),
    ]
    initializers = [
        numpy_helper.from_array(weight, "W"),
        numpy_helper.from_array(np.asarray([1, 1, 2, 2], np.float32), "scales"),
        numpy_helper.from_array(np.asarray([3, -1], np.int64), "starts"),
        numpy_helper.from_array(np.asarray([0, -100], np.int64), "ends"),
        numpy_helper.from_array(np.asarray([1, 3], np.int64), "axes"),
        numpy_helper.from_array(np.asarray([-1, -2], np.int64), "steps"),
    ]
    graph = helper.make_graph(
        nodes,
        "nhwc",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 5, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "RTS"],
        initializers,
    )
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    )
    shapes = {"X": (1, 3, 5, 4)}
    plan = lower(model, shapes)
    lowerings = {**dm.LOWERINGS, **rs.LOWERINGS, **lower_conv.LOWERINGS}
    for layer in plan.layers:
        if layer.op_type == "Conv":
            layer.tactic = next(n for n in lower_conv.LOWERINGS if n.startswith("conv_igemm_f32"))
        else:
            layer.tactic = {"Concat": "concat_b4", "Resize": "resize_f32"}.get(layer.op_type, "")
            layer.tactic = layer.tactic or f"{layer.op_type.lower()}_b4"
    memory = plan_memory(plan, BuilderConfig(), shapes)
    launch_plan = lower_launch_plan(plan, memory, shapes, lowerings)
    entries = [s.entry for s in launch_plan.steps if isinstance(s, KernelLaunch)]
    assert sorted(entries) == sorted(
        [
            "gie_nchw_to_nhwc_f32",  # the graph input, for the convolution
            "gie_conv_implicit_gemm_f32",
            "gie_concat_b4",
            "gie_concat_b4",
            "gie_resize_nhwc_f32",
            "gie_nhwc_to_nchw_f32",  # R, a graph output
            "gie_transpose_b4",  # reads Y's NHWC storage directly
            "gie_slice_b4",  # so does Slice
        ]
    ), entries
    x = RNG.standard_normal((1, 3, 5, 4)).astype(np.float32)
    runner = CudaRunner(launch_plan, ShimDevice(shim_cache), use_graph=False)
    got = runner.run({"X": x})
    runner.close()
    conv = reference("Conv", [x, weight], {"pads": [1, 1, 1, 1]})
    concat = np.concatenate([conv, conv], axis=1)
    want = reference("Resize", [concat, None, np.asarray([1, 1, 2, 2], np.float32)], {})
    np.testing.assert_allclose(got["R"], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["T"], conv.transpose(0, 2, 1, 3), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["S"], conv[:, 3:0:-1, :, -1::-2], rtol=1e-4, atol=1e-5)
    # Nearest x2 repeats every pixel: the concatenation is exactly every other one.
    np.testing.assert_array_equal(got["R"][..., ::2, ::2], got["R"][..., 1::2, 1::2])

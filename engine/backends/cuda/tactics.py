"""The CUDA tactic catalogue, as data: which kernel (file, entry point, ``-D`` tile parameters)
can run which layer, and why not when it cannot.

A :class:`CudaTactic` names its kernel (``kernels/<kernel_file>`` and ``entry``; library tactics
name the cuBLAS call and the helper kernel of their epilogue), the input dtypes and layer
precisions it computes, the oldest compute capability it runs on, and a ``check(layer, plan)``
returning the refusal reason for shapes/attributes it cannot handle. Constraints of the
kernels that exist (read from their sources):

* ``gemm_simt.cu``: row-major A [M, K], B [K, N], any M, N, K (bounds-checked tiles); the tile
  (``GIE_GEMM_BM`` x ``GIE_GEMM_BN``, steps of ``GIE_GEMM_BK``) needs BM, BN multiples of 16
  (16 x 16 threads); epilogue bias [N] per column, one activation, a residual of the output's
  own shape before or after it. No batch dimension, no transposed A, no alpha/beta scaling.
* ``gemm_mma_f16.cu``: the same contract, fp16 in/out, mma.sync m16n8k16 + ldmatrix +
  cp.async: compute capability 8.0+. Correct at any M, N, K; rows go through cp.async only
  when K and N are multiples of 8 (16-byte chunks), element copies otherwise (slower).
* ``gemm_batched.cu``: C[z] = scale * A[z] @ B[z] by strides, no epilogue (MatMul whose batch
  dims are equal or broadcast from one side); the fp16 variant is mma.sync (8.0+).
* ``gemm_int8.cu``: IMMA m16n8k32 (8.0+), gie::QGemm / gie::QMatMul with int8 activations, one
  entry per output dtype (s8 / f32 / f16), K <= 131071, A not transposed.
* ``gemm_sparse.cu``: mma.sp from the compressed 2:4 weight (engine.build.sparse_tactics'
  check: constant 2:4 weight, K % 4 == 0); the s8 entry writes int8 only.
* ``conv_implicit_gemm.cu``: 2-D NHWC convolution, any group dividing C and M, fewer than 2^31
  pixels, SIMT (fp32, fp16 storage), tile ``GIE_CONV_BM`` x ``GIE_CONV_BN``;
  ``conv_depthwise.cu``: group = C = M. ``pool.cu``: 2-D max / average / global average
  pools in NHWC. ``reformat.cu``: fp32 <-> fp16 casts, int8 (de)quantization at a constant
  per-tensor scale with zero point 0.
* ``softmax.cu``: softmax over the last axis of [rows, cols]; ``layernorm.cu``/``rmsnorm.cu``:
  normalization over the trailing ``cols`` elements, gamma/beta of ``cols`` elements, a residual
  of X's own shape; ``elementwise.cu``: act(x + bias[col]) for one activation.

Planned kernels (tensor-core and int8 implicit-GEMM convolution: 16-byte NHWC channel
vectors, so C % 8 for fp16 and C % 16 for int8; im2col for cuBLAS convolution; the requantizing
epilogue after cuBLAS int8) are catalogued with those constraints and refused with "not
written yet" until their file holds the entry point. Candidates are also filtered by
``BuilderConfig.tactic_sources`` (family names of :data:`CUDA_TACTIC_FAMILIES`) and
``BuilderConfig.sparsity``. SIMT tiles over twice the output in both dimensions are refused
(a smaller tile covers it) to keep the timed set small.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from engine.backends.cuda.device_info import DeviceInfo
from engine.backends.cuda.nvrtc import KERNEL_DIR
from engine.backends.cuda.tactic_checks import (
    Check,
    all_of,
    cast_check,
    check_batched,
    check_cublas_gemm,
    check_own_gemm,
    conv_check,
    input_name,
    int8_gemm_check,
    k_multiple_check,
    last_axis_check,
    norm_check,
    pointwise_check,
    pool_check,
    scale_check,
    tile_check,
)
from engine.build.plan import Layer, Plan
from engine.build.sparse_tactics import check_sparse
from engine.config import BuilderConfig, Precision, SparsityMode

#: Bump when a tactic is added, removed or changes its kernel: it keys the timing cache.
CATALOGUE_VERSION = "cuda-tactics-3"

CUDA_TACTIC_FAMILIES: dict[str, str] = {
    "gemm_simt": "SIMT GEMM tiles with fused epilogue (fp32, fp16 storage)",
    "gemm_tensor_core": "fp16 mma.sync tensor-core GEMM",
    "gemm_batched": "strided batched GEMM for attention (SIMT fp32, mma fp16)",
    "gemm_int8": "int8 IMMA GEMM with the requantizing epilogue (QGemm, QMatMul)",
    "sparse": "2:4 sparse mma.sp GEMM, fp16 and int8 (BuilderConfig.sparsity on/force)",
    "conv_implicit_gemm": "implicit-GEMM convolution in NHWC (SIMT fp32/fp16; mma, int8 planned)",
    "conv_depthwise": "depthwise convolution in NHWC",
    "conv_1x1_gemm": "1x1 stride-1 convolution as one GEMM over NHWC activations",
    "pool": "max / average / global average pooling in NHWC",
    "reformat": "casts fp32 <-> fp16 and int8 (de)quantization at a per-tensor scale",
    "pointwise": "generated gie::Pointwise kernels and bias + activation",
    "softmax": "row softmax over the last axis",
    "normalization": "LayerNorm (+ residual) and RMSNorm",
    "cublas": "cuBLAS gemmEx through CuPy (fp32, tf32, fp16, int8) and im2col + cuBLAS conv",
    "attention": "fused flash-style attention (online softmax, masks, causal; SIMT, mma fp16)",
    "rnn": "LSTM / GRU as one persistent kernel over all time steps",
    "reshape": "reshape-like ops as a device copy (none when the memory plan aliases them)",
    "data_movement": "transpose, concat, slice, gather, resize, im2col",
    "conv_tensor_core": "implicit-GEMM convolution on tensor cores (fp16 mma, int8 IMMA)",
    "conv_transpose": "transposed convolution in gather form over NHWC",
}

F32, F16, I8 = ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.INT8
FLOAT_PRECISIONS = frozenset({Precision.FP32, Precision.TF32})
GEMM_OPS = frozenset({"MatMul", "Gemm", "gie::GemmAct"})
CONV_OPS = frozenset({"Conv", "gie::ConvAct"})
ACTIVATION_OPS = frozenset({"Relu", "Sigmoid", "Tanh", "LeakyRelu", "gie::Gelu"})


@dataclass(frozen=True)
class CudaTactic:
    """One CUDA implementation of some ops (see the module docstring)."""

    name: str
    family: str
    ops: frozenset[str]
    kernel_file: str | None  # under kernels/; None: generated source or library only
    entry: str  # the kernel's extern "C" entry point, or the library call
    defines: tuple[tuple[str, int], ...] = ()  # -D tile parameters
    check: Check | None = None
    min_cc: tuple[int, int] = (8, 0)
    dtypes: frozenset[ir.DataType] = frozenset({F32})  # of the data input (int8: the weight)
    precisions: frozenset[Precision] = FLOAT_PRECISIONS
    library: str = ""  # "cublas" for library tactics

    def options(self) -> list[str]:
        """NVRTC options selecting this tactic's tile parameters."""
        return [f"-D{name}={value}" for name, value in self.defines]


# --------------------------------------------------------------------------- the catalogue

F16_ONLY, I8_ONLY = frozenset({Precision.FP16}), frozenset({Precision.INT8})
F32S, F16S, I8S = frozenset({F32}), frozenset({F16}), frozenset({I8})
INT8_GEMM_OPS = frozenset({"gie::QGemm", "gie::QMatMul"})
FLOATS = frozenset({F32, F16, ir.DataType.DOUBLE})
ANY_PRECISION = frozenset(Precision)


def _simt(bm: int, bn: int, bk: int) -> CudaTactic:
    defines = (("GIE_GEMM_BM", bm), ("GIE_GEMM_BN", bn), ("GIE_GEMM_BK", bk))
    name = f"gemm_simt_f32_{bm}x{bn}x{bk}"
    return CudaTactic(
        name, "gemm_simt", GEMM_OPS, "gemm_simt.cu", "gie_gemm_simt_f32", defines,
        tile_check(bm, bn), (5, 0),
    )  # fmt: skip


CATALOGUE: tuple[CudaTactic, ...] = (
    *(_simt(*tile) for tile in ((32, 32, 16), (64, 64, 16), (128, 64, 8), (128, 128, 8))),
    CudaTactic("gemm_simt_f16_64x64x16", "gemm_simt", GEMM_OPS, "gemm_simt.cu",
               "gie_gemm_simt_f16", (), check_own_gemm, (5, 3), F16S, F16_ONLY),
    CudaTactic("gemm_mma_f16", "gemm_tensor_core", GEMM_OPS, "gemm_mma_f16.cu",
               "gie_gemm_mma_f16", (), check_own_gemm, (8, 0), F16S, F16_ONLY),
    CudaTactic("gemm_batched_f32", "gemm_batched", frozenset({"MatMul"}), "gemm_batched.cu",
               "gie_gemm_batched_f32", (), check_batched, (5, 0)),
    CudaTactic("gemm_batched_mma_f16", "gemm_batched", frozenset({"MatMul"}), "gemm_batched.cu",
               "gie_gemm_batched_mma_f16", (), check_batched, (8, 0), F16S, F16_ONLY),
    *(
        CudaTactic(f"gemm_imma_{out}", "gemm_int8", INT8_GEMM_OPS, "gemm_int8.cu",
                   f"gie_gemm_int8_{out}", (), int8_gemm_check(dtype), (8, 0), I8S, I8_ONLY)
        for out, dtype in (("s8", I8), ("f32", F32), ("f16", F16))
    ),
    CudaTactic("gemm_sparse_f16", "sparse", GEMM_OPS, "gemm_sparse.cu", "gie_gemm_sparse_f16",
               (), all_of(check_sparse, check_own_gemm), (8, 0), F16S, F16_ONLY),
    CudaTactic("gemm_sparse_s8", "sparse", frozenset({"gie::QGemm"}), "gemm_sparse.cu",
               "gie_gemm_sparse_s8", (), all_of(check_sparse, int8_gemm_check(I8)), (8, 0), I8S,
               I8_ONLY),
    *(
        CudaTactic(f"conv_igemm_{suffix}_{bm}x{bn}", "conv_implicit_gemm", CONV_OPS,
                   "conv_implicit_gemm.cu", f"gie_conv_implicit_gemm_{suffix}",
                   (("GIE_CONV_BM", bm), ("GIE_CONV_BN", bn)), conv_check(group="any"), cc,
                   frozenset({dtype}), precisions)
        for suffix, dtype, precisions, cc in (
            ("f32", F32, FLOAT_PRECISIONS, (5, 0)), ("f16", F16, F16_ONLY, (5, 3)),
        )
        for bm, bn in ((64, 64), (128, 64))
    ),
    CudaTactic("conv_depthwise_f32", "conv_depthwise", CONV_OPS, "conv_depthwise.cu",
               "gie_conv_depthwise_f32", (), conv_check(group="depthwise"), (5, 0)),
    CudaTactic("conv_depthwise_f16", "conv_depthwise", CONV_OPS, "conv_depthwise.cu",
               "gie_conv_depthwise_f16", (), conv_check(group="depthwise"), (5, 3), F16S,
               F16_ONLY),
    CudaTactic("conv1x1_gemm_simt_f32", "conv_1x1_gemm", CONV_OPS, "gemm_simt.cu",
               "gie_gemm_simt_f32", (), conv_check(one_by_one=True), (5, 0)),
    CudaTactic("conv1x1_gemm_mma_f16", "conv_1x1_gemm", CONV_OPS, "gemm_mma_f16.cu",
               "gie_gemm_mma_f16", (), conv_check(one_by_one=True), (8, 0), F16S, F16_ONLY),
    *(
        CudaTactic(f"{kind}_{suffix}", "pool", frozenset({op}), "pool.cu", f"gie_{kind}_{suffix}",
                   (), pool_check, cc, frozenset({dtype}), precisions)
        for kind, op in (
            ("max_pool", "MaxPool"), ("average_pool", "AveragePool"),
            ("global_average_pool", "GlobalAveragePool"),
        )
        for suffix, dtype, precisions, cc in (
            ("f32", F32, ANY_PRECISION, (5, 0)), ("f16", F16, ANY_PRECISION, (5, 3)),
        )
    ),
    CudaTactic("cast_f32_to_f16", "reformat", frozenset({"Cast"}), "reformat.cu",
               "gie_cast_f32_to_f16", (), cast_check(F16), (5, 3), F32S, ANY_PRECISION),
    CudaTactic("cast_f16_to_f32", "reformat", frozenset({"Cast"}), "reformat.cu",
               "gie_cast_f16_to_f32", (), cast_check(F32), (5, 3), F16S, ANY_PRECISION),
    CudaTactic("quantize_f32_s8", "reformat", frozenset({"QuantizeLinear"}), "reformat.cu",
               "gie_quantize_f32_s8", (), scale_check, (5, 0), F32S, ANY_PRECISION),
    CudaTactic("quantize_f16_s8", "reformat", frozenset({"QuantizeLinear"}), "reformat.cu",
               "gie_quantize_f16_s8", (), scale_check, (5, 3), F16S, ANY_PRECISION),
    CudaTactic("dequantize_s8_f32", "reformat", frozenset({"DequantizeLinear"}), "reformat.cu",
               "gie_dequantize_s8_f32", (), scale_check, (5, 0), I8S, ANY_PRECISION),
    CudaTactic("pointwise_generated", "pointwise", frozenset({"gie::Pointwise"}), None,
               "generated", (), pointwise_check, (5, 0), FLOATS, ANY_PRECISION),
    CudaTactic("bias_act_f32", "pointwise", ACTIVATION_OPS, "elementwise.cu",
               "gie_bias_act_f32", (), None, (5, 0)),
    CudaTactic("bias_act_f16", "pointwise", ACTIVATION_OPS, "elementwise.cu",
               "gie_bias_act_f16", (), None, (5, 3), F16S, F16_ONLY),
    CudaTactic("softmax_f32", "softmax", frozenset({"Softmax"}), "softmax.cu", "gie_softmax_f32",
               (), last_axis_check, (5, 0)),
    CudaTactic("softmax_f16", "softmax", frozenset({"Softmax"}), "softmax.cu", "gie_softmax_f16",
               (), last_axis_check, (5, 3), F16S, F16_ONLY),
    *(
        CudaTactic(f"{kind}_{suffix}", "normalization", ops, f"{kind}.cu", f"gie_{kind}_{suffix}",
                   (), norm_check, cc, frozenset({dtype}), precisions)
        for kind, ops in (
            ("layernorm", frozenset({"gie::LayerNorm", "LayerNormalization"})),
            ("rmsnorm", frozenset({"gie::RMSNorm"})),
        )
        for suffix, dtype, precisions, cc in (
            ("f32", F32, FLOAT_PRECISIONS, (5, 0)), ("f16", F16, F16_ONLY, (5, 3)),
        )
    ),
    CudaTactic("cublas_fp32", "cublas", GEMM_OPS, "elementwise.cu", "cublasGemmEx",
               library="cublas", check=check_cublas_gemm, min_cc=(5, 0),
               precisions=frozenset({Precision.FP32})),
    CudaTactic("cublas_tf32", "cublas", GEMM_OPS, "elementwise.cu", "cublasGemmEx",
               library="cublas", check=check_cublas_gemm, precisions=frozenset({Precision.TF32})),
    CudaTactic("cublas_fp16", "cublas", GEMM_OPS, "elementwise.cu", "cublasGemmEx",
               library="cublas", check=check_cublas_gemm, min_cc=(5, 3), dtypes=F16S,
               precisions=F16_ONLY),
    *(
        CudaTactic(f"cublas_int8_{out}", "cublas", frozenset({"gie::QGemm"}),
                   "requant_epilogue.cu", f"gie_requant_{out}", library="cublas",
                   check=all_of(int8_gemm_check(dtype),
                                k_multiple_check(4, "cuBLAS int8 needs K % 4 == 0")),
                   min_cc=(6, 1), dtypes=I8S, precisions=I8_ONLY)
        for out, dtype in (("s8", I8), ("f32", F32), ("f16", F16))
    ),
    CudaTactic("im2col_cublas_fp32", "cublas", CONV_OPS, "data_movement.cu",
               "gie_im2col_nhwc_f32", library="cublas", check=conv_check(), min_cc=(5, 0)),
    CudaTactic("im2col_cublas_fp16", "cublas", CONV_OPS, "data_movement.cu",
               "gie_im2col_nhwc_f16", library="cublas", check=conv_check(), min_cc=(5, 3),
               dtypes=F16S, precisions=F16_ONLY),
)  # fmt: skip


def full_catalogue() -> tuple[CudaTactic, ...]:
    """:data:`CATALOGUE` plus the tactics the lowering modules add (cuda.lowerings)."""
    from engine.backends.cuda.lowerings import extra_tactics

    return (*CATALOGUE, *extra_tactics())


def tactics_for(op: str) -> list[CudaTactic]:
    """The catalogue's tactics for a qualified op (``"gie::GemmAct"``)."""
    return [t for t in full_catalogue() if op in t.ops]


def find_tactic(name: str) -> CudaTactic:
    """A tactic by name (ValueError when unknown)."""
    for tactic in full_catalogue():
        if tactic.name == name:
            return tactic
    raise ValueError(f"no CUDA tactic {name!r}")


def lowering_missing(tactic: CudaTactic) -> str | None:
    """Why the engine cannot launch the tactic yet (no lowering function for it)."""
    from engine.backends.cuda.lowerings import all_lowerings

    if tactic.name not in all_lowerings():
        return f"{tactic.name} has no lowering into launches yet"
    return None


def kernel_missing(tactic: CudaTactic) -> str | None:
    """Why the tactic's kernel cannot be compiled yet (its file lacks the entry point)."""
    if tactic.kernel_file is None:
        return None
    path = KERNEL_DIR / tactic.kernel_file
    wanted = tactic.entry if not tactic.library else ""
    if not path.is_file() or wanted not in path.read_text():
        return f"kernel {tactic.kernel_file} ({tactic.entry}) is not written yet"
    return None


def _data_dtype(layer: Layer, plan: Plan, tactic: CudaTactic) -> ir.DataType | None:
    index = {"QGemm": 2, "QConv": 2}.get(layer.op_type, 0) if I8 in tactic.dtypes else 0
    spec = plan.specs.get(input_name(layer, index))
    return None if spec is None else spec.dtype


def cuda_why_not(layer: Layer, plan: Plan, name: str, device: DeviceInfo) -> str | None:
    """Why tactic ``name`` cannot run ``layer`` on ``device`` (None when it can)."""
    tactic = find_tactic(name)
    if layer.qualified_op not in tactic.ops:
        return f"{name} does not run {layer.qualified_op}"
    if device.compute_capability < tactic.min_cc:
        major, minor = tactic.min_cc
        return f"{name} needs compute capability {major}.{minor}+, {device.name} is {device.cc}"
    missing = kernel_missing(tactic) or lowering_missing(tactic)
    if missing is not None:
        return missing
    if tactic.library and not device.cupy_version:
        return f"{name} calls {tactic.library} through CuPy, which is missing"
    dtype = _data_dtype(layer, plan, tactic)
    if dtype not in tactic.dtypes:
        wanted = "/".join(sorted(d.name for d in tactic.dtypes))
        return f"{name} handles {wanted} data, got {dtype.name if dtype else 'unknown'}"
    if layer.precision not in tactic.precisions:
        wanted = "/".join(sorted(p.value for p in tactic.precisions))
        return f"{name} computes in {wanted}, the layer is {layer.precision.value}"
    return tactic.check(layer, plan) if tactic.check else None


def cuda_refusals(
    layer: Layer, plan: Plan, config: BuilderConfig, device: DeviceInfo
) -> dict[str, str | None]:
    """Every tactic of the layer's op with its refusal reason (None: a candidate)."""
    reasons: dict[str, str | None] = {}
    for tactic in tactics_for(layer.qualified_op):
        sources = config.tactic_sources
        if sources is not None and tactic.family not in sources:
            reasons[tactic.name] = f"family {tactic.family} is not in the tactic sources"
        elif tactic.family == "sparse" and config.sparsity == SparsityMode.OFF:
            reasons[tactic.name] = "sparsity is off"
        else:
            reasons[tactic.name] = cuda_why_not(layer, plan, tactic.name, device)
    return reasons


def cuda_candidates(
    layer: Layer, plan: Plan, config: BuilderConfig, device: DeviceInfo
) -> list[str]:
    """Tactics the selector may time for ``layer`` on ``device``, in catalogue order. Empty
    when no CUDA kernel runs the layer (it needs a host fallback or a new kernel)."""
    return [n for n, r in cuda_refusals(layer, plan, config, device).items() if r is None]


__all__ = [
    "CATALOGUE",
    "CATALOGUE_VERSION",
    "CUDA_TACTIC_FAMILIES",
    "CudaTactic",
    "cuda_candidates",
    "cuda_refusals",
    "cuda_why_not",
    "find_tactic",
    "full_catalogue",
    "kernel_missing",
    "lowering_missing",
    "tactics_for",
]

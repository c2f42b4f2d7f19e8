"""The NumPy backend's tactic catalogue: alternative kernels for the layers where they matter.

A tactic is one implementation of a layer's op; every tactic computes what the registry's
reference kernel computes (to float32 rounding) and the selector times the applicable ones.
``"reference"`` (the registry kernel) applies to every layer. The others, by op:

Conv, gie::ConvAct
    ``im2col_gemm``: the reference's im2col path, always taken (one strided-window copy, one
    batched GEMM over the groups); ``direct``: one GEMM (or, depthwise, one multiply) per kernel
    tap on a strided view of the padded input, no im2col buffer; ``winograd_f2x3``: Winograd
    F(2x2, 3x3) for 3x3 stride-1 dilation-1 ungrouped 2-D convolutions (16 GEMMs on transformed
    2x2 output tiles: 2.25x fewer multiplies).
MatMul, Gemm, gie::GemmAct
    ``matmul``: ``np.matmul`` on the operands as given; ``einsum``: ``np.einsum`` with an
    optimized contraction; ``transposed_b``: a constant 2-D ``B`` stored once transposed from the
    layout the model gives it, contiguous, and multiplied through a transposed view.
gie::Attention
    ``batched``: all heads in one batched matmul (the reference algorithm); ``per_head``: a
    loop over the heads (smaller score buffers).
Conv, gie::ConvAct, Gemm, MatMul, gie::GemmAct with a 2:4 weight
    ``sparse_2_4``: from the compressed weight (engine.build.sparse_tactics), offered only when
    ``BuilderConfig.sparsity`` is on or force.

The implementations live in :mod:`engine.build.tactic_kernels`. Fused ops compute their core
with the tactic and reuse the op's own epilogue (:func:`engine.ops.gie_fused.apply_epilogue`).
Tactics that prepare a weight (transposed_b, direct, winograd) keep the prepared copy of the
last weight array they saw (by identity), so a refit that passes new arrays gets new prepared
weights.

Tactic sources (``BuilderConfig.tactic_sources``) enable families by name: see
:data:`TACTIC_FAMILIES`. ``None`` enables all; a layer left without any candidate gets
``reference``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir

from engine.build.emulation import emulate_precision
from engine.build.plan import Layer, Plan
from engine.build.sparse_tactics import (
    SPARSE_CONV_OPS,
    SPARSE_GEMM_OPS,
    SPARSE_INT8_OPS,
    check_sparse,
    sparse_conv_kernel,
    sparse_gemm_kernel,
    sparse_qconv_kernel,
    sparse_qgemm_kernel,
)
from engine.build.tactic_kernels import (
    ConvCore,
    attention_per_head,
    check_einsum,
    check_transposed_b,
    check_winograd,
    conv_kernel,
    direct_core,
    einsum_product,
    gemm_kernel,
    im2col_core,
    matmul_product,
    transposed_b_product,
    winograd_core,
)
from engine.config import BuilderConfig, SparsityMode
from engine.ops.gie_transformer import _attention_kernel
from engine.ops.registry import Kernel, default_registry

#: Tactic families a config may enable (``BuilderConfig.tactic_sources``), with their meaning.
TACTIC_FAMILIES: dict[str, str] = {
    "reference": "the registry's reference kernel (every op)",
    "im2col": "convolution as im2col + one GEMM (im2col_gemm)",
    "direct": "convolution accumulated over kernel taps without an im2col buffer (direct)",
    "winograd": "Winograd F(2x2,3x3) for 3x3 stride-1 convolutions (winograd_f2x3)",
    "blas": "GEMMs through np.matmul, as given or with a pre-transposed weight "
    "(matmul, transposed_b)",
    "einsum": "GEMMs through np.einsum (einsum)",
    "attention_batched": "attention with all heads in one batched matmul (batched)",
    "attention_per_head": "attention looping over the heads (per_head)",
    "sparse": "2:4 structured-sparse convolution/GEMM from the compressed weight (sparse_2_4; "
    "only with BuilderConfig.sparsity on/force, for weights that are 2:4)",
}

CONV_OPS = frozenset({"Conv", "gie::ConvAct"})
GEMM_OPS = frozenset({"MatMul", "Gemm", "gie::GemmAct"})
ATTENTION_OPS = frozenset({"gie::Attention"})
#: Input dtypes the non-reference tactics handle (others keep the reference kernel).
FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})

Check = Callable[[Layer, Plan], "str | None"]


@dataclass(frozen=True)
class Tactic:
    """One implementation: ``build(layer)`` makes its kernel, ``check`` says why it does not
    apply to a layer (None when it does)."""

    name: str
    family: str
    ops: frozenset[str]
    build: Callable[[Layer], Kernel]
    check: Check | None = None


# --------------------------------------------------------------------------- catalogue


def _fixed(kernel: Kernel) -> Callable[[Layer], Kernel]:
    return lambda layer: kernel


def _conv_tactics(name: str, family: str, core: Callable[[], ConvCore], check: Check | None):
    return [
        Tactic(name, family, frozenset({"Conv"}), conv_kernel(core, False), check),
        Tactic(name, family, frozenset({"gie::ConvAct"}), conv_kernel(core, True), check),
    ]


_CATALOGUE: list[Tactic] = [
    *_conv_tactics("im2col_gemm", "im2col", lambda: im2col_core, None),
    *_conv_tactics("direct", "direct", direct_core, None),
    *_conv_tactics("winograd_f2x3", "winograd", winograd_core, check_winograd),
    Tactic("matmul", "blas", GEMM_OPS, gemm_kernel(matmul_product)),
    Tactic("einsum", "einsum", GEMM_OPS, gemm_kernel(einsum_product), check_einsum),
    Tactic("transposed_b", "blas", GEMM_OPS, gemm_kernel(transposed_b_product), check_transposed_b),
    Tactic("batched", "attention_batched", ATTENTION_OPS, _fixed(_attention_kernel)),
    Tactic("per_head", "attention_per_head", ATTENTION_OPS, _fixed(attention_per_head)),
    Tactic("sparse_2_4", "sparse", SPARSE_CONV_OPS, sparse_conv_kernel, check_sparse),
    Tactic("sparse_2_4", "sparse", SPARSE_GEMM_OPS, sparse_gemm_kernel, check_sparse),
    Tactic("sparse_2_4", "sparse", frozenset({"gie::QConv"}), sparse_qconv_kernel, check_sparse),
    Tactic("sparse_2_4", "sparse", frozenset({"gie::QGemm"}), sparse_qgemm_kernel, check_sparse),
]


def tactics_for(op: str) -> list[Tactic]:
    """The catalogue's tactics for a qualified op (``"gie::ConvAct"``), reference excluded."""
    return [t for t in _CATALOGUE if op in t.ops]


def _find(layer: Layer, name: str) -> Tactic:
    for tactic in tactics_for(layer.qualified_op):
        if tactic.name == name:
            return tactic
    known = ["reference", *(t.name for t in tactics_for(layer.qualified_op))]
    raise ValueError(
        f"layer {layer.name}: no tactic {name!r} for {layer.qualified_op}; known: {known}"
    )


def check_tactic_sources(sources: frozenset[str] | None) -> None:
    """Refuse unknown family names in ``BuilderConfig.tactic_sources`` (ValueError)."""
    unknown = sorted(set(sources or ()) - set(TACTIC_FAMILIES))
    if unknown:
        raise ValueError(f"unknown tactic sources {unknown}; known: {sorted(TACTIC_FAMILIES)}")


def why_not(layer: Layer, plan: Plan, name: str) -> str | None:
    """Why tactic ``name`` cannot run ``layer`` (None when it can); ValueError if unknown."""
    if name == "reference":
        return None
    tactic = _find(layer, name)
    spec = plan.specs.get(layer.inputs[0])
    if spec is None or spec.dtype is None:
        return f"{name} needs a known input dtype"
    int8_layer = layer.qualified_op in SPARSE_INT8_OPS and spec.dtype == ir.DataType.INT8
    if spec.dtype not in FLOAT_TYPES and not int8_layer:
        return f"{name} handles float16/float32/float64 inputs only (got {spec.dtype.name})"
    return tactic.check(layer, plan) if tactic.check else None


def candidate_tactics(layer: Layer, plan: Plan, config: BuilderConfig) -> list[str]:
    """Tactics the selector may time for ``layer``: enabled by ``config.tactic_sources`` and
    applicable to its shapes and attributes; ``["reference"]`` when nothing else is left."""
    check_tactic_sources(config.tactic_sources)
    enabled = config.tactic_sources
    names = [] if enabled is not None and "reference" not in enabled else ["reference"]
    for tactic in tactics_for(layer.qualified_op):
        if enabled is not None and tactic.family not in enabled:
            continue
        if tactic.family == "sparse" and config.sparsity == SparsityMode.OFF:
            continue
        if why_not(layer, plan, tactic.name) is None:
            names.append(tactic.name)
    return names or ["reference"]


def make_kernel(layer: Layer, name: str) -> Kernel:
    """The kernel of tactic ``name`` for ``layer`` (a fresh one: prepared weights not shared),
    computing in the layer's precision (engine.build.emulation)."""
    if name == "reference":
        spec = default_registry().lookup(layer.op_type, layer.domain)
        if spec is None:
            raise ValueError(f"layer {layer.name}: no reference kernel for {layer.qualified_op}")
        return emulate_precision(spec.kernel, layer)
    return emulate_precision(_find(layer, name).build(layer), layer)


def tactic_kernel(layer: Layer) -> Kernel:
    """The kernel implementing ``layer.tactic`` ("reference" = the registry kernel)."""
    return make_kernel(layer, layer.tactic)


__all__ = [
    "TACTIC_FAMILIES",
    "Tactic",
    "candidate_tactics",
    "check_tactic_sources",
    "make_kernel",
    "tactic_kernel",
    "tactics_for",
    "why_not",
]

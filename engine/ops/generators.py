"""Tensor generators: Constant, ConstantOfShape, Range, EyeLike and the random ops.

Random ops draw from the node's ``seed`` attribute when given (reproducible per node) and from
``KernelContext.rng`` otherwise; their values cannot match another runtime's, only shape and dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from engine.ops.common import elementwise_cost, metadata_cost
from engine.ops.registry import (
    Attrs,
    Kernel,
    KernelContext,
    KernelError,
    OpSpec,
    ShapeRule,
    TensorSpec,
    dtype_of_array,
)
from engine.ops.shape_ops import folding

Dim = int | str | None

# --------------------------------------------------------------------------- Constant


def _strings(values: Any) -> np.ndarray:
    """Strings (or bytes) as the object array of ``str`` the engine uses for string tensors."""
    array = np.asarray(values, dtype=object)
    flat = [v.decode() if isinstance(v, bytes) else str(v) for v in array.ravel()]
    return np.array(flat, dtype=object).reshape(array.shape)


def _sparse_to_dense(sparse: Any) -> np.ndarray:
    """Dense array of a sparse tensor attribute (an ``onnx.SparseTensorProto``)."""
    from onnx import numpy_helper

    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    dims = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(dims, dtype=values.dtype)
    if indices.ndim == 1:
        dense.reshape(-1)[indices] = values
    else:
        dense[tuple(indices.T)] = values
    return dense


def _constant_value(attrs: Attrs) -> np.ndarray:
    """The value of a Constant node from whichever ``value*`` attribute it carries."""
    if "value" in attrs:
        value = np.asarray(attrs.get("value"))
        return _strings(value) if value.dtype.kind in "SUO" else value
    if "sparse_value" in attrs:
        return _sparse_to_dense(attrs.get("sparse_value"))
    if "value_float" in attrs:
        return np.array(attrs.float("value_float"), dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs.floats("value_floats"), dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs.int("value_int"), dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs.ints("value_ints"), dtype=np.int64)
    if "value_string" in attrs:
        return _strings(attrs.str("value_string"))
    if "value_strings" in attrs:
        return _strings(attrs.strs("value_strings"))
    raise KernelError("Constant has none of the value attributes")


def _constant(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    return [_constant_value(attrs)]


def _constant_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    value = _constant_value(attrs)
    return [TensorSpec(tuple(int(d) for d in value.shape), dtype_of_array(value), value)]


# --------------------------------------------------------------------------- ConstantOfShape


def _fill_value(attrs: Attrs) -> np.ndarray:
    """The 1-element fill of ConstantOfShape (float32 zero by default)."""
    if "value" not in attrs:
        return np.zeros((), dtype=np.float32)
    return np.asarray(attrs.get("value")).reshape(-1)[:1].reshape(())


def _constant_of_shape(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    shape = tuple(int(d) for d in np.asarray(inputs[0]).ravel())
    if any(d < 0 for d in shape):
        raise KernelError(f"ConstantOfShape: negative dim in {list(shape)}")
    fill = _fill_value(attrs)
    return [np.full(shape, fill, dtype=fill.dtype)]


def _constant_of_shape_shape(
    specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext
) -> list[TensorSpec]:
    fill = _fill_value(attrs)
    dtype = dtype_of_array(fill)
    source = specs[0]
    if source.value is not None:
        return [TensorSpec(tuple(int(d) for d in np.asarray(source.value).ravel()), dtype)]
    if source.shape is not None and isinstance(source.shape[0], int):
        return [TensorSpec((None,) * source.shape[0], dtype)]
    return [TensorSpec(None, dtype)]


# --------------------------------------------------------------------------- Range, EyeLike


def _range_count(start: Any, limit: Any, delta: Any) -> int:
    if delta == 0:
        raise KernelError("Range: delta must not be 0")
    return max(int(np.ceil((float(limit) - float(start)) / float(delta))), 0)


def _range(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """``start + i * delta`` for ``i`` in ``[0, ceil((limit - start) / delta))``."""
    start, limit, delta = (np.asarray(v).reshape(()) for v in inputs)
    count = _range_count(start, limit, delta)
    if start.dtype.kind in "iu":
        return [(start + np.arange(count, dtype=start.dtype) * delta).astype(start.dtype)]
    steps = np.arange(count, dtype=np.float64)
    return [(start.astype(np.float64) + steps * delta.astype(np.float64)).astype(start.dtype)]


def _range_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    dtype = specs[0].dtype
    if all(s.value is not None for s in specs[:3]):
        count = _range_count(*(np.asarray(s.value).reshape(()) for s in specs[:3]))
        return [TensorSpec((count,), dtype)]
    return [TensorSpec((None,), dtype)]


def _dtype_attr(attrs: Attrs, default: np.dtype) -> np.dtype:
    """The numpy dtype named by the ``dtype`` attribute, else ``default``."""
    if "dtype" not in attrs:
        return np.dtype(default)
    return np.dtype(ir.DataType(attrs.int("dtype")).numpy())


def _eye_like(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    if x.ndim != 2:
        raise KernelError(f"EyeLike needs a 2-D input, got rank {x.ndim}")
    dtype = _dtype_attr(attrs, x.dtype)
    return [np.eye(x.shape[0], x.shape[1], k=attrs.int("k", 0), dtype=dtype)]


def _like_rule(default_dtype: ir.DataType | None = None) -> ShapeRule:
    """Output has the shape of input 0 and the ``dtype`` attribute's type (else input 0's)."""

    def rule(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
        dtype = specs[0].dtype if default_dtype is None else default_dtype
        if "dtype" in attrs:
            dtype = ir.DataType(attrs.int("dtype"))
        return [TensorSpec(specs[0].shape, dtype)]

    return rule


# --------------------------------------------------------------------------- random ops


def _generator(attrs: Attrs, ctx: KernelContext) -> np.random.Generator:
    if "seed" in attrs:
        return np.random.default_rng(int(np.float32(attrs.float("seed")).view(np.uint32)))
    return ctx.rng


def _sample(
    attrs: Attrs, ctx: KernelContext, shape: tuple[int, ...], dtype: np.dtype, normal: bool
) -> np.ndarray:
    rng = _generator(attrs, ctx)
    if normal:
        values = rng.normal(attrs.float("mean", 0.0), attrs.float("scale", 1.0), size=shape)
    else:
        values = rng.uniform(attrs.float("low", 0.0), attrs.float("high", 1.0), size=shape)
    return values.astype(dtype)


def _random_kernel(normal: bool, like: bool) -> Kernel:
    def kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
        if like:
            shape, dtype = inputs[0].shape, _dtype_attr(attrs, inputs[0].dtype)
        else:
            shape, dtype = tuple(attrs.ints("shape") or []), _dtype_attr(attrs, np.float32)
        return [_sample(attrs, ctx, tuple(shape), dtype, normal)]

    return kernel


def _random_shape(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    dtype = ir.DataType(attrs.int("dtype", ir.DataType.FLOAT.value))
    return [TensorSpec(tuple(attrs.ints("shape") or []), dtype)]


def _bernoulli(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """1 with probability ``input``, else 0, in the ``dtype`` attribute's type (default input's)."""
    p = inputs[0]
    draws = _generator(attrs, ctx).uniform(0.0, 1.0, size=p.shape)
    return [(draws < p).astype(_dtype_attr(attrs, p.dtype))]


def _multinomial(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """``sample_size`` class indices per batch row drawn from unnormalised log-probabilities."""
    logits = np.asarray(inputs[0], dtype=np.float64)
    if logits.ndim != 2:
        raise KernelError(f"Multinomial needs [batch, classes] input, got rank {logits.ndim}")
    samples = attrs.int("sample_size", 1)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    cdf = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
    draws = _generator(attrs, ctx).uniform(0.0, 1.0, size=(logits.shape[0], samples))
    chosen = (draws[:, :, None] > cdf[:, None, :]).sum(axis=2)
    chosen = np.minimum(chosen, logits.shape[1] - 1)
    return [chosen.astype(_dtype_attr(attrs, np.int32))]


def _multinomial_shape(
    specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext
) -> list[TensorSpec]:
    x = specs[0]
    batch = x.shape[0] if x.shape else None
    dtype = ir.DataType(attrs.int("dtype", ir.DataType.INT32.value))
    return [TensorSpec((batch, attrs.int("sample_size", 1)), dtype)]


OPS: list[OpSpec] = [
    OpSpec("Constant", _constant, _constant_shape, metadata_cost, family="generator"),
    OpSpec(
        "ConstantOfShape",
        _constant_of_shape,
        _constant_of_shape_shape,
        metadata_cost,
        family="generator",
    ),
    OpSpec("Range", _range, folding(_range_shape, _range), elementwise_cost(2), family="generator"),
    OpSpec("EyeLike", _eye_like, _like_rule(), metadata_cost, family="generator"),
    OpSpec(
        "RandomNormal",
        _random_kernel(True, False),
        _random_shape,
        elementwise_cost(4),
        family="generator",
    ),
    OpSpec(
        "RandomUniform",
        _random_kernel(False, False),
        _random_shape,
        elementwise_cost(2),
        family="generator",
    ),
    OpSpec(
        "RandomNormalLike",
        _random_kernel(True, True),
        _like_rule(),
        elementwise_cost(4),
        family="generator",
    ),
    OpSpec(
        "RandomUniformLike",
        _random_kernel(False, True),
        _like_rule(),
        elementwise_cost(2),
        family="generator",
    ),
    OpSpec("Bernoulli", _bernoulli, _like_rule(), elementwise_cost(2), family="generator"),
    OpSpec(
        "Multinomial", _multinomial, _multinomial_shape, elementwise_cost(4), family="generator"
    ),
]

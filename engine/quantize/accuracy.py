"""Accuracy of reduced-precision engines: per-layer error, output agreement, first divergence.

The reference is an fp32 engine of the *same fused plan*: built from the same model at the same
optimization level, so its compute layers have the same names and outputs; only the
precisions (and the conversion layers between them) differ. Each compute layer's output is
compared at that fusion boundary, int8 outputs dequantized with their scale:

* SQNR (dB) = 10 log10(sum ref^2 / sum (ref - x)^2) (inf when equal),
* cosine similarity of the flattened tensors,
* max |ref - x|.

Statistics accumulate over every batch of the data. :func:`first_divergent` names the first
layer in execution order whose error crosses a threshold: where to look when accuracy drops.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from engine.build.plan import Layer
from engine.runtime import Engine


@dataclass
class _Accumulator:
    """Running sums for SQNR/cosine/max-abs between a reference and an approximation."""

    ref_sq: float = 0.0
    err_sq: float = 0.0
    dot: float = 0.0
    x_sq: float = 0.0
    max_abs: float = 0.0
    elements: int = 0

    def add(self, reference: np.ndarray, value: np.ndarray) -> None:
        ref = np.asarray(reference, dtype=np.float64).ravel()
        x = np.asarray(value, dtype=np.float64).ravel()
        if ref.shape != x.shape:
            raise ValueError(f"shapes differ: reference {ref.shape}, value {x.shape}")
        diff = ref - x
        self.ref_sq += float(ref @ ref)
        self.err_sq += float(diff @ diff)
        self.dot += float(ref @ x)
        self.x_sq += float(x @ x)
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))
        self.elements += int(ref.size)

    @property
    def sqnr_db(self) -> float:
        if self.err_sq == 0.0:
            return math.inf
        if self.ref_sq == 0.0:
            return -math.inf
        if not (math.isfinite(self.ref_sq) and math.isfinite(self.err_sq)):
            return math.nan  # non-finite values (an fp16 overflow): no meaningful SQNR
        return 10.0 * math.log10(self.ref_sq / self.err_sq)

    @property
    def cosine(self) -> float:
        if self.ref_sq == 0.0 and self.x_sq == 0.0:
            return 1.0
        if self.ref_sq == 0.0 or self.x_sq == 0.0:
            return 0.0
        if not all(math.isfinite(v) for v in (self.ref_sq, self.x_sq, self.dot)):
            return math.nan
        return self.dot / math.sqrt(self.ref_sq * self.x_sq)


@dataclass(frozen=True)
class TensorError:
    """Error of one tensor vs the fp32 reference: ``sqnr_db``, ``cosine``, ``max_abs``
    over ``elements`` values (all batches)."""

    name: str
    sqnr_db: float
    cosine: float
    max_abs: float
    elements: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LayerError:
    """Error at one fusion boundary: the compute layer, its op and precision, and the error of
    its (first) output tensor vs the same layer of the fp32 engine."""

    index: int
    layer: str
    op: str
    precision: str
    tensor: str
    sqnr_db: float
    cosine: float
    max_abs: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def base_name(value: str) -> str:
    """The model's name of a value the precision rewrite renamed (``"y::fp16"`` -> ``"y"``)."""
    return value.split("::", 1)[0]


def _as_float(layer: Layer, output: Any, inputs: list[Any]) -> np.ndarray | None:
    """A layer output as float64; int8 outputs of gie::Q* layers dequantized by their scale."""
    if not isinstance(output, np.ndarray) or output.dtype == object:
        return None
    if output.dtype == np.int8 and layer.domain == "gie" and layer.op_type.startswith("Q"):
        scale_index = 4 if layer.op_type == "QMatMul" else 6
        scale = inputs[scale_index] if len(inputs) > scale_index else None
        if scale is None:
            return None
        return output.astype(np.float64) * float(np.asarray(scale))
    if not np.issubdtype(output.dtype, np.floating):
        return None
    return output.astype(np.float64)


def _layer_outputs(engine: Engine, feeds: Mapping[str, Any]) -> tuple[dict, dict]:
    """(outputs by layer name as float64 copies, engine outputs) of one run."""
    taken: dict[str, tuple[Layer, str, np.ndarray]] = {}

    def record(layer: Layer, inputs: list[Any], outputs: list[Any]) -> None:
        if layer.role != "compute" or not outputs:
            return
        value = _as_float(layer, outputs[0], inputs)
        if value is not None:
            taken[layer.name] = (layer, layer.outputs[0], value)

    result = engine.run_observed(feeds, record)
    return taken, result


def output_errors(
    reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]
) -> dict[str, TensorError]:
    """Error of each float output vs the reference outputs (one batch)."""
    errors = {}
    for name, ref in reference.items():
        if name not in outputs or not np.issubdtype(np.asarray(ref).dtype, np.floating):
            continue
        acc = _Accumulator()
        acc.add(ref, outputs[name])
        errors[name] = TensorError(name, acc.sqnr_db, acc.cosine, acc.max_abs, acc.elements)
    return errors


def worst_output_cosine(
    reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]
) -> float:
    """The lowest cosine over the float outputs (1.0 when there is none)."""
    return min((e.cosine for e in output_errors(reference, outputs).values()), default=1.0)


def compare_engines(
    reference: Engine, engine: Engine, batches: Iterable[Mapping[str, Any]]
) -> tuple[list[LayerError], dict[str, TensorError]]:
    """Per-layer errors (fusion boundaries both engines share, in ``engine``'s execution order)
    and per-output errors of ``engine`` vs ``reference`` over ``batches``."""
    layer_acc: dict[str, _Accumulator] = {}
    output_acc: dict[str, _Accumulator] = {}
    meta: dict[str, tuple[Layer, str]] = {}
    for feeds in batches:
        ref_layers, ref_out = _layer_outputs(reference, feeds)
        ref_by_tensor = {base_name(t): v for _, t, v in ref_layers.values()}
        got_layers, got_out = _layer_outputs(engine, feeds)
        for name, (layer, tensor, value) in got_layers.items():
            ref = ref_by_tensor.get(base_name(tensor))
            if ref is None or ref.shape != value.shape:
                continue
            layer_acc.setdefault(name, _Accumulator()).add(ref, value)
            meta[name] = (layer, tensor)
        for name, ref in ref_out.items():
            if name in got_out and np.issubdtype(np.asarray(ref).dtype, np.floating):
                output_acc.setdefault(name, _Accumulator()).add(ref, got_out[name])
    layers = []
    for name, acc in layer_acc.items():
        layer, tensor = meta[name]
        layers.append(
            LayerError(
                layer.index,
                name,
                layer.qualified_op,
                layer.precision.value,
                base_name(tensor),
                acc.sqnr_db,
                acc.cosine,
                acc.max_abs,
            )
        )
    layers.sort(key=lambda e: e.index)
    outputs = {
        name: TensorError(name, a.sqnr_db, a.cosine, a.max_abs, a.elements)
        for name, a in output_acc.items()
    }
    return layers, outputs


def first_divergent(
    errors: Iterable[LayerError], min_cosine: float = 0.999, min_sqnr_db: float | None = None
) -> LayerError | None:
    """The first layer (execution order) whose cosine falls below ``min_cosine`` or whose
    SQNR falls below ``min_sqnr_db`` (when given); None when every layer is within."""
    for error in sorted(errors, key=lambda e: e.index):
        if error.cosine < min_cosine:
            return error
        if min_sqnr_db is not None and error.sqnr_db < min_sqnr_db:
            return error
    return None


def top1_agreement(reference: Iterable[np.ndarray], outputs: Iterable[np.ndarray]) -> float:
    """Fraction of rows (argmax over the last axis) where ``outputs`` agree with ``reference``."""
    agree = total = 0
    for ref, out in zip(reference, outputs):
        a = np.argmax(np.asarray(ref), axis=-1)
        b = np.argmax(np.asarray(out), axis=-1)
        agree += int(np.sum(a == b))
        total += int(a.size)
    return agree / total if total else 1.0


__all__ = [
    "LayerError",
    "TensorError",
    "base_name",
    "compare_engines",
    "first_divergent",
    "output_errors",
    "top1_agreement",
    "worst_output_cosine",
]

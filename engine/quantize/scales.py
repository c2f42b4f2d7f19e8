"""Quantization scales the builder uses: where they came from and what they are.

One record joins the two ways a model gets int8 scales:

* post-training calibration (implicit quantization): a per-tensor scale for every float
  activation from a calibrator (:mod:`engine.quantize.calibrate`) or a calibration cache;
* explicit quantization (QAT): the scales written in the model's QuantizeLinear/
  DequantizeLinear nodes (:mod:`engine.quantize.qdq_import`), plus the weight scales of its
  dequantized weights.

Scales are float32-representable floats: ``real = scale * q`` with ``q`` in [-128, 127].
``amax`` (the largest |x| seen per tensor, calibration only) lets the builder keep in fp32 the
layers whose activations would overflow fp16.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Largest finite float16 value.
FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantScales:
    """Per-tensor activation scales (tensor name -> scale), optional per-channel weight scales
    (initializer name -> (scales, axis)), the largest |x| seen per tensor, whether the scales
    are explicit (from Q/DQ nodes: every such tensor is stored int8), and a one-line source."""

    activation: Mapping[str, float] = field(default_factory=dict)
    weights: Mapping[str, tuple[np.ndarray, int]] = field(default_factory=dict)
    amax: Mapping[str, float] = field(default_factory=dict)
    explicit: bool = False
    source: str = ""

    def scale(self, tensor: str) -> float | None:
        """The activation scale of ``tensor`` (None when it has none)."""
        value = self.activation.get(tensor)
        return None if value is None else float(value)

    def overflows_fp16(self, tensor: str) -> float | None:
        """The tensor's max |x| when it exceeds the float16 range, else None."""
        value = self.amax.get(tensor)
        return float(value) if value is not None and value > FP16_MAX else None

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "explicit": self.explicit,
            "activation": {k: float(v) for k, v in sorted(self.activation.items())},
            "amax": {k: float(v) for k, v in sorted(self.amax.items())},
        }


__all__ = ["FP16_MAX", "QuantScales"]

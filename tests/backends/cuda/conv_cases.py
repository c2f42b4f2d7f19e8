"""The convolution case the conv kernel tests share (test_cuda_conv, _conv_mma, _conv_int8):
NCHW geometry, ONNX pads, the gie::ConvAct epilogue, and the reference attributes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ConvCase:
    """NCHW input (n, c, h, w), m output channels, a k x k filter, ONNX pads (top, left,
    bottom, right) and the epilogue (``alpha`` of LeakyRelu, ``clip`` = (min, max) bounds)."""

    n: int
    c: int
    h: int
    w: int
    m: int
    k: int
    stride: int = 1
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: int = 1
    group: int = 1
    bias: bool = True
    activation: str = ""
    residual: bool = False
    residual_first: int = 1
    alpha: float = 0.1
    clip: tuple[float, float] | None = None

    def out(self) -> tuple[int, int]:
        span = (self.k - 1) * self.dilation + 1
        oh = (self.h + self.pads[0] + self.pads[2] - span) // self.stride + 1
        ow = (self.w + self.pads[1] + self.pads[3] - span) // self.stride + 1
        return oh, ow

    def attributes(self) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "group": self.group,
            "strides": [self.stride] * 2,
            "pads": list(self.pads),
            "dilations": [self.dilation] * 2,
            "kernel_shape": [self.k] * 2,
            "activation": self.activation,
            "residual_before_activation": self.residual_first,
            "activation_alpha": self.alpha,
        }
        if self.clip is not None:
            attributes["min"], attributes["max"] = self.clip
        return attributes

"""Signal processing: DFT, STFT, the window generators (Hann, Hamming, Blackman), MelWeightMatrix.

Complex tensors follow ONNX's convention: a trailing dimension of 2 holds (real, imaginary);
a trailing dimension of 1 is a real signal.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from engine.ops.common import declared_rule, elementwise_cost, metadata_cost, spec
from engine.ops.registry import Attrs, KernelContext, KernelError, OpCost, OpSpec, TensorSpec


def _to_complex(x: np.ndarray) -> np.ndarray:
    """[..., 1] real or [..., 2] (re, im) -> complex array without the trailing dim."""
    precision = np.complex64 if x.dtype.itemsize <= 4 else np.complex128
    if x.shape[-1] == 1:
        return x[..., 0].astype(precision)
    return (x[..., 0] + 1j * x[..., 1]).astype(precision)


def _to_pairs(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.stack([values.real, values.imag], axis=-1).astype(dtype)


def _transform(
    x: np.ndarray, length: int | None, axis: int, inverse: bool, onesided: bool
) -> np.ndarray:
    axis = axis % x.ndim
    if length is None:
        length = 2 * (x.shape[axis] - 1) if inverse and onesided else x.shape[axis]
    signal = _to_complex(x)
    if inverse and onesided:
        return np.fft.irfft(signal, n=length, axis=axis)[..., np.newaxis].astype(x.dtype)
    if inverse:
        return _to_pairs(np.fft.ifft(signal, n=length, axis=axis), x.dtype)
    spectrum = np.fft.fft(signal, n=length, axis=axis)
    if onesided:
        spectrum = np.take(spectrum, np.arange(length // 2 + 1), axis=axis)
    return _to_pairs(spectrum, x.dtype)


def _optional_int(inputs: list[Any], index: int) -> int | None:
    if len(inputs) > index and inputs[index] is not None and np.size(inputs[index]):
        return int(np.asarray(inputs[index]).reshape(-1)[0])
    return None


def _dft(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    x = inputs[0]
    length = _optional_int(inputs, 1)
    if ctx.opset >= 20:
        axis = _optional_int(inputs, 2)
        axis = -2 if axis is None else axis
    else:
        axis = attrs.int("axis", 1)
    inverse = bool(attrs.int("inverse", 0))
    return [_transform(x, length, axis, inverse, bool(attrs.int("onesided", 0)))]


def _stft(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """Short-time Fourier transform of [batch, length, 1|2] into [batch, frames, bins, 2]."""
    x, step = inputs[0], int(np.asarray(inputs[1]).reshape(-1)[0])
    window = inputs[2] if len(inputs) > 2 else None
    frame_length = _optional_int(inputs, 3)
    if frame_length is None:
        frame_length = x.shape[-2] if window is None else window.shape[0]
    if window is None:
        window = np.ones(frame_length, dtype=x.dtype)
    frames = 1 + (x.shape[1] - frame_length) // step
    starts = np.arange(frames) * step
    index = starts[:, None] + np.arange(frame_length)[None, :]
    framed = _to_complex(x)[:, index] * window
    spectrum = np.fft.fft(framed, n=frame_length, axis=-1)
    if attrs.int("onesided", 1):
        spectrum = spectrum[..., : frame_length // 2 + 1]
    return [_to_pairs(spectrum, x.dtype)]


def _window(coefficients: tuple[float, ...]):
    """Generalised cosine window sum_k (-1)^k a_k cos(2 pi k n / N)."""

    def kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
        size = int(np.asarray(inputs[0]).reshape(-1)[0])
        periodic = bool(attrs.int("periodic", 1))
        dtype = ir.DataType(attrs.int("output_datatype", 1)).numpy()
        denominator = size if periodic else size - 1
        n = np.arange(size, dtype=np.float64)
        values = np.zeros(size)
        for k, a in enumerate(coefficients):
            values += (-1) ** k * a * np.cos(2 * np.pi * k * n / max(denominator, 1))
        return [values.astype(dtype)]

    return kernel


def _mel_edges(
    num_mel_bins: int, dft_length: int, sample_rate: int, lower: Any, upper: Any
) -> np.ndarray:
    """Spectrogram bin of each triangle corner: num_mel_bins + 2 points evenly spaced in mel.

    mel(f) = 2595 log10(1 + f / 700); the mel range is cut into num_mel_bins + 2 steps (as the
    ONNX reference and onnxruntime do) and each corner f maps to bin floor((dft_length + 1) f / sr).
    """
    low_mel = 2595 * np.log1p(lower / 700) / np.log(10)
    high_mel = 2595 * np.log1p(upper / 700) / np.log(10)
    mels = np.arange(num_mel_bins + 2) * ((high_mel - low_mel) / (num_mel_bins + 2)) + low_mel
    hertz = 700 * np.expm1(mels / 2595 * np.log(10))
    return (((dft_length + 1) * hertz) // sample_rate).astype(np.int64)


def _mel_weight_matrix(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
    """[dft_length // 2 + 1, num_mel_bins] triangular filterbank, each triangle peaking at 1."""
    num_mel_bins, dft_length, sample_rate = (int(np.asarray(v).reshape(-1)[0]) for v in inputs[:3])
    lower, upper = (np.asarray(v).reshape(-1)[0] for v in inputs[3:5])
    if num_mel_bins <= 0 or dft_length <= 0 or sample_rate <= 0:
        raise KernelError("MelWeightMatrix needs positive num_mel_bins, dft_length, sample_rate")
    edges = _mel_edges(num_mel_bins, dft_length, sample_rate, lower, upper)
    left, center, right = edges[None, :-2], edges[None, 1:-1], edges[None, 2:]
    bins = np.arange(dft_length // 2 + 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        rising = np.where((bins >= left) & (bins < center), (bins - left) / (center - left), 0.0)
        falling = np.where((bins > center) & (bins < right), (right - bins) / (right - center), 0.0)
    weights = rising + (bins == center) + falling
    dtype = ir.DataType(attrs.int("output_datatype", ir.DataType.FLOAT)).numpy()
    return [weights.astype(dtype)]


def _mel_rule(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
    """[dft_length // 2 + 1, num_mel_bins] when both are constants, else the declared shape."""
    dtype = ir.DataType(attrs.int("output_datatype", ir.DataType.FLOAT))
    mel, dft = specs[0].value, specs[1].value
    if mel is not None and dft is not None:
        rows, cols = (
            int(np.asarray(dft).reshape(-1)[0]) // 2 + 1,
            int(np.asarray(mel).reshape(-1)[0]),
        )
        return [TensorSpec((rows, cols), dtype)]
    declared = declared_rule(specs, attrs, ctx)
    shape = declared[0].shape if declared else None
    return [TensorSpec(shape if shape is not None else (None, None), dtype)]


def _fft_cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
    elements = outs[0].numel() if outs and outs[0].is_static else 0
    return OpCost(
        5 * elements * max(int(np.log2(max(elements, 2))), 1),
        sum(s.nbytes() for s in ins if s is not None),
        outs[0].nbytes() if outs else 0,
    )


OPS: list[OpSpec] = [
    spec("DFT", _dft, declared_rule, _fft_cost, "signal"),
    spec("STFT", _stft, declared_rule, _fft_cost, "signal"),
    spec("HannWindow", _window((0.5, 0.5)), declared_rule, metadata_cost, "signal"),
    spec("HammingWindow", _window((25 / 46, 21 / 46)), declared_rule, metadata_cost, "signal"),
    spec("BlackmanWindow", _window((0.42, 0.5, 0.08)), declared_rule, metadata_cost, "signal"),
    spec("MelWeightMatrix", _mel_weight_matrix, _mel_rule, elementwise_cost(6), "signal"),
]

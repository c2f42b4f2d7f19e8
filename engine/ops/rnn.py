"""Recurrent ops: LSTM, GRU and RNN (ONNX semantics, all directions and optional inputs).

Shapes (layout 0): X ``[seq, batch, input]``; W ``[dirs, gates*H, input]``; R ``[dirs, gates*H,
H]``; B ``[dirs, 2*gates*H]``; outputs Y ``[seq, dirs, batch, H]``, Y_h / Y_c ``[dirs, batch, H]``.
Layout 1 puts batch first (X ``[batch, seq, input]``, Y ``[batch, seq, dirs, H]``, Y_h
``[batch, dirs, H]``). Every time step is computed for the whole batch at once; batch entries
past their ``sequence_lens`` keep their state and emit zeros.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from engine.ops.common import _bytes
from engine.ops.registry import Attrs, KernelContext, KernelError, OpCost, OpSpec, TensorSpec

FAMILY = "rnn"

Activation = Callable[[np.ndarray], np.ndarray]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _make_activation(name: str, alpha: float | None, beta: float | None) -> Activation:
    """Activation function by its ONNX RNN name, with alpha/beta defaults of the spec."""
    key = name.lower()
    if key == "sigmoid":
        return _sigmoid
    if key == "tanh":
        return np.tanh
    if key == "relu":
        return lambda x: np.maximum(x, 0)
    if key == "affine":
        a, b = alpha if alpha is not None else 1.0, beta if beta is not None else 0.0
        return lambda x: a * x + b
    if key == "leakyrelu":
        a = alpha if alpha is not None else 0.01
        return lambda x: np.where(x >= 0, x, a * x)
    if key == "thresholdedrelu":
        a = alpha if alpha is not None else 1.0
        return lambda x: np.where(x > a, x, 0)
    if key == "scaledtanh":
        a, b = alpha if alpha is not None else 1.0, beta if beta is not None else 1.0
        return lambda x: a * np.tanh(b * x)
    if key == "hardsigmoid":
        a, b = alpha if alpha is not None else 0.2, beta if beta is not None else 0.5
        return lambda x: np.clip(a * x + b, 0, 1)
    if key == "elu":
        a = alpha if alpha is not None else 1.0
        return lambda x: np.where(x >= 0, x, a * (np.exp(x) - 1))
    if key == "softsign":
        return lambda x: x / (1 + np.abs(x))
    if key == "softplus":
        return lambda x: np.log1p(np.exp(x))
    raise KernelError(f"unsupported RNN activation '{name}'")


_USES_ALPHA = {"affine", "leakyrelu", "thresholdedrelu", "scaledtanh", "hardsigmoid", "elu"}
_USES_BETA = {"affine", "scaledtanh", "hardsigmoid"}


def _activations(attrs: Attrs, defaults: list[str], directions: int) -> list[list[Activation]]:
    """Per direction, the activation functions; alpha/beta are consumed only by users of them."""
    names = attrs.strs("activations") or defaults * directions
    if len(names) == len(defaults) and directions == 2:
        names = names * 2
    if len(names) != len(defaults) * directions:
        raise KernelError(f"expected {len(defaults) * directions} activations, got {names}")
    alphas = list(attrs.floats("activation_alpha") or [])
    betas = list(attrs.floats("activation_beta") or [])
    functions = []
    for name in names:
        alpha = alphas.pop(0) if name.lower() in _USES_ALPHA and alphas else None
        beta = betas.pop(0) if name.lower() in _USES_BETA and betas else None
        functions.append(_make_activation(name, alpha, beta))
    count = len(defaults)
    return [functions[d * count : (d + 1) * count] for d in range(directions)]


StepFunction = Callable[..., tuple[np.ndarray, np.ndarray | None]]


def _lstm_step(
    xw: np.ndarray,
    h: np.ndarray,
    c: np.ndarray,
    r: np.ndarray,
    rb: np.ndarray,
    p: np.ndarray,
    acts: list[Activation],
    clip: float | None,
    hidden: int,
    attrs: Attrs,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One LSTM step for the batch: ``xw`` is X_t·W^T + Wb ``[batch, 4H]``, ``h``/``c`` the
    previous hidden/cell state ``[batch, H]``, ``r``/``rb``/``p`` this direction's recurrence
    weights, recurrence bias and peepholes; returns the new (h, c)."""
    f, g, hf = acts
    gates = xw + h @ r.T + rb
    if clip is not None:
        gates = np.clip(gates, -clip, clip)
    gi, go, gf, gc = (gates[:, k * hidden : (k + 1) * hidden] for k in range(4))
    pi, po, pf = (p[k * hidden : (k + 1) * hidden] for k in range(3))
    i = f(gi + pi * c)
    forget = 1 - i if attrs.int("input_forget", 0) else f(gf + pf * c)
    c_new = forget * c + i * g(gc)
    o = f(go + po * c_new)
    return o * hf(c_new), c_new


def _gru_step(
    xw: np.ndarray,
    h: np.ndarray,
    c: np.ndarray,
    r: np.ndarray,
    rb: np.ndarray,
    p: np.ndarray,
    acts: list[Activation],
    clip: float | None,
    hidden: int,
    attrs: Attrs,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One GRU step (gate order z, r, h); same arguments as :func:`_lstm_step`, no cell."""
    f, g = acts
    rz, rr, rh = (r[k * hidden : (k + 1) * hidden] for k in range(3))
    bz, br, bh = (rb[k * hidden : (k + 1) * hidden] for k in range(3))
    xz, xr, xh = (xw[:, k * hidden : (k + 1) * hidden] for k in range(3))

    def clipped(v: np.ndarray) -> np.ndarray:
        return v if clip is None else np.clip(v, -clip, clip)

    z = f(clipped(xz + h @ rz.T + bz))
    reset = f(clipped(xr + h @ rr.T + br))
    if attrs.int("linear_before_reset", 0):
        candidate = g(clipped(xh + reset * (h @ rh.T + bh)))
    else:
        candidate = g(clipped(xh + (reset * h) @ rh.T + bh))
    return (1 - z) * candidate + z * h, None


def _rnn_step(
    xw: np.ndarray,
    h: np.ndarray,
    c: np.ndarray,
    r: np.ndarray,
    rb: np.ndarray,
    p: np.ndarray,
    acts: list[Activation],
    clip: float | None,
    hidden: int,
    attrs: Attrs,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One plain RNN step: H_t = f(X_t·W^T + H_{t-1}·R^T + Wb + Rb)."""
    gates = xw + h @ r.T + rb
    if clip is not None:
        gates = np.clip(gates, -clip, clip)
    return acts[0](gates), None


_CELLS: dict[str, tuple[int, list[str], StepFunction]] = {
    "LSTM": (4, ["Sigmoid", "Tanh", "Tanh"], _lstm_step),
    "GRU": (3, ["Sigmoid", "Tanh"], _gru_step),
    "RNN": (1, ["Tanh"], _rnn_step),
}


def _reverse_within_lengths(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Reverse each batch entry's first ``length`` steps of a ``[seq, batch, ...]`` array."""
    seq = x.shape[0]
    steps = np.arange(seq)[:, None]
    index = np.where(steps < lengths[None, :], lengths[None, :] - 1 - steps, steps)
    return np.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=0)


def _recurrent_kernel(op_type: str) -> Any:
    gate_count, default_acts, step = _CELLS[op_type]

    def kernel(inputs: list[Any], attrs: Attrs, ctx: KernelContext) -> list[Any]:
        padded = list(inputs) + [None] * (8 - len(inputs))
        x, w, r, b, lengths, h0 = padded[:6]
        c0 = padded[6] if op_type == "LSTM" else None
        peep = padded[7] if op_type == "LSTM" else None
        dtype = x.dtype
        layout = attrs.int("layout", 0)
        if layout:
            x = np.swapaxes(x, 0, 1)
            h0 = None if h0 is None else np.swapaxes(h0, 0, 1)
            c0 = None if c0 is None else np.swapaxes(c0, 0, 1)
        seq, batch = x.shape[0], x.shape[1]
        directions, hidden = w.shape[0], r.shape[-1]
        direction = attrs.str("direction", "forward")
        if (direction == "bidirectional") != (directions == 2):
            raise KernelError(f"direction '{direction}' does not match W with {directions} dirs")
        if attrs.get("hidden_size") is not None and attrs.int("hidden_size") != hidden:
            raise KernelError(f"hidden_size {attrs.int('hidden_size')} != R's {hidden}")
        lengths = np.full(batch, seq, np.int64) if lengths is None else lengths.astype(np.int64)
        b = np.zeros((directions, 2 * gate_count * hidden), dtype) if b is None else b
        h0 = np.zeros((directions, batch, hidden), dtype) if h0 is None else h0
        c0 = np.zeros((directions, batch, hidden), dtype) if c0 is None else c0
        peep = np.zeros((directions, 3 * hidden), dtype) if peep is None else peep
        clip = attrs.get("clip")
        acts = _activations(attrs, default_acts, directions)
        y = np.zeros((seq, directions, batch, hidden), dtype)
        y_h = np.zeros((directions, batch, hidden), dtype)
        y_c = np.zeros((directions, batch, hidden), dtype)
        for d in range(directions):
            reverse = direction == "reverse" or d == 1
            xd = _reverse_within_lengths(x, lengths) if reverse else x
            xw = xd @ w[d].T + b[d, : gate_count * hidden]
            rb = b[d, gate_count * hidden :]
            h, c = h0[d], c0[d]
            outputs = np.zeros((seq, batch, hidden), dtype)
            for t in range(seq):
                active = (t < lengths)[:, None]
                h_new, c_new = step(xw[t], h, c, r[d], rb, peep[d], acts[d], clip, hidden, attrs)
                h = np.where(active, h_new, h).astype(dtype)
                if c_new is not None:
                    c = np.where(active, c_new, c).astype(dtype)
                outputs[t] = np.where(active, h, 0)
            y[:, d] = _reverse_within_lengths(outputs, lengths) if reverse else outputs
            y_h[d], y_c[d] = h, c
        if layout:
            y = np.transpose(y, (2, 0, 1, 3))
            y_h, y_c = np.swapaxes(y_h, 0, 1), np.swapaxes(y_c, 0, 1)
        results = [y, y_h, y_c] if op_type == "LSTM" else [y, y_h]
        return results[: ctx.output_count]

    return kernel


def _recurrent_shape(op_type: str) -> Any:
    def rule(specs: list[TensorSpec], attrs: Attrs, ctx: KernelContext) -> list[TensorSpec]:
        x, r = specs[0], specs[2]
        dtype = x.dtype
        layout = attrs.int("layout", 0)
        seq = batch = None
        if x.shape is not None:
            seq, batch = (x.shape[1], x.shape[0]) if layout else (x.shape[0], x.shape[1])
        dirs = 2 if attrs.str("direction", "forward") == "bidirectional" else 1
        hidden = attrs.get("hidden_size")
        if hidden is None and r.shape is not None:
            hidden = r.shape[-1]
        if layout:
            y, state = (batch, seq, dirs, hidden), (batch, dirs, hidden)
        else:
            y, state = (seq, dirs, batch, hidden), (dirs, batch, hidden)
        count = 3 if op_type == "LSTM" else 2
        specs_out = [TensorSpec(y, dtype)] + [TensorSpec(state, dtype)] * (count - 1)
        return specs_out[: ctx.output_count]

    return rule


def _recurrent_cost(op_type: str) -> Any:
    gate_count = _CELLS[op_type][0]

    def cost(ins: list[TensorSpec], outs: list[TensorSpec], attrs: Attrs) -> OpCost:
        x, w, r = ins[0], ins[1], ins[2]
        flops = 0
        if x.is_static and w.is_static and r.is_static:
            seq_batch = int(x.shape[0]) * int(x.shape[1])  # type: ignore[index]
            dirs, hidden, size = int(w.shape[0]), int(r.shape[-1]), int(w.shape[-1])  # type: ignore[index]
            matmul = 2 * seq_batch * gate_count * hidden * (size + hidden) * dirs
            pointwise = seq_batch * dirs * hidden * (4 * gate_count + 2)
            flops = matmul + pointwise
        return OpCost(flops, _bytes(ins), _bytes(outs))

    return cost


OPS: list[OpSpec] = [
    OpSpec(
        name,
        _recurrent_kernel(name),
        _recurrent_shape(name),
        _recurrent_cost(name),
        family=FAMILY,
    )
    for name in ("LSTM", "GRU", "RNN")
]

"""Timing tactics: timers (wall clock, fake) and the timing cache.

A :class:`Timer` runs one candidate kernel and returns its per-run latencies in milliseconds
(after warm-up). Given ``abort_above_ms`` it may stop after its first :data:`PROBE_RUNS` runs
when all of them are above that limit (the selector passes twice the best median so far): the
candidate is clearly slower and its remaining runs would only cost build time.

:class:`TimingCache` is TensorRT's timing cache for this engine: a JSON file mapping a layer's
timing key (op signature, input shapes and dtypes, precision, fused epilogue, device identity,
library and engine versions) to every candidate's timing and the winner, so a second build of
the same model times nothing. Writers take an advisory lock (``fcntl.flock`` on ``PATH.lock``),
merge with what is on disk, write a temporary file and ``os.replace`` it: concurrent builds
never leave a torn or half-merged file. A corrupt or foreign file is reported (``warnings``)
and treated as empty; the next save replaces it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from engine.build.plan import Layer, Plan, TacticTiming

try:  # advisory locking is POSIX-only; elsewhere the atomic replace still prevents torn files
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOGGER = logging.getLogger(__name__)

#: Timed runs after which a candidate may be abandoned as clearly slower.
PROBE_RUNS = 2
#: A warm-up run this many times above the abort limit ends a candidate's timing at once.
WARMUP_ABORT_FACTOR = 2.0
CACHE_FORMAT = "gie-timing-cache"
CACHE_VERSION = 1
#: Attributes of the fused epilogue (gie::ConvAct / gie::GemmAct), keyed separately.
EPILOGUE_ATTRIBUTES = ("activation", "activation_alpha", "min", "max", "residual_before_activation")


class Timer(Protocol):
    """Measures one candidate: ``run()`` executes the kernel once on prepared inputs."""

    iterations: int

    def time(
        self,
        layer: Layer,
        tactic: str,
        run: Callable[[], object],
        abort_above_ms: float | None = None,
    ) -> list[float]:
        """Per-run latencies (ms) of the timed runs; fewer than ``iterations`` when aborted."""
        ...


def clearly_slower(samples: list[float], abort_above_ms: float | None) -> bool:
    """Whether the probe runs so far justify abandoning the candidate."""
    return (
        abort_above_ms is not None
        and len(samples) >= PROBE_RUNS
        and min(samples[:PROBE_RUNS]) > abort_above_ms
    )


class WallClockTimer:
    """``warmup`` untimed runs, then up to ``iterations`` samples timed with
    ``time.perf_counter``. A sample of a very short kernel averages back-to-back runs until it
    lasts about ``min_sample_ms`` (at most ``max_repeats`` runs; TensorRT's timer does the
    same), so microsecond kernels are not ranked on clock noise. A candidate whose warm-up run
    alone exceeds :data:`WARMUP_ABORT_FACTOR` times the abort limit (4x the best median) is
    abandoned right after it, with that run as its only sample."""

    def __init__(
        self,
        warmup: int = 1,
        iterations: int = 5,
        min_sample_ms: float = 0.5,
        max_repeats: int = 64,
    ) -> None:
        if iterations < 1 or warmup < 0 or max_repeats < 1:
            raise ValueError("need iterations >= 1, warmup >= 0 and max_repeats >= 1")
        self.warmup = warmup
        self.iterations = iterations
        self.min_sample_ms = min_sample_ms
        self.max_repeats = max_repeats

    def time(
        self,
        layer: Layer,
        tactic: str,
        run: Callable[[], object],
        abort_above_ms: float | None = None,
    ) -> list[float]:
        once_ms = math.inf
        for _ in range(self.warmup):
            start = time.perf_counter()
            run()
            once_ms = min(once_ms, (time.perf_counter() - start) * 1e3)
        warmed = math.isfinite(once_ms)  # no warm-up runs: nothing to judge yet
        if warmed and abort_above_ms is not None and once_ms > WARMUP_ABORT_FACTOR * abort_above_ms:
            return [once_ms]  # hopeless already in warm-up: one (warm-up) sample, aborted
        repeats = 1
        if math.isfinite(once_ms) and self.min_sample_ms > 0:
            wanted = math.ceil(self.min_sample_ms / max(once_ms, 1e-6))
            repeats = max(1, min(self.max_repeats, wanted))
        samples: list[float] = []
        for _ in range(self.iterations):
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            samples.append((time.perf_counter() - start) * 1e3 / repeats)
            if len(samples) == PROBE_RUNS and clearly_slower(samples, abort_above_ms):
                break
        return samples


class FakeTimer:
    """Deterministic timer for tests: a candidate "takes" ``costs[tactic]`` ms (or
    ``costs(layer, tactic)``; unknown tactics cost ``default_ms``) on every run. The kernel is
    not executed unless ``execute``. ``calls`` records every (layer name, tactic) timed."""

    def __init__(
        self,
        costs: Mapping[str, float] | Callable[[Layer, str], float],
        iterations: int = 5,
        default_ms: float = 1.0,
        execute: bool = False,
    ) -> None:
        self.costs = costs
        self.iterations = iterations
        self.default_ms = default_ms
        self.execute = execute
        self.calls: list[tuple[str, str]] = []

    def cost(self, layer: Layer, tactic: str) -> float:
        if callable(self.costs):
            return float(self.costs(layer, tactic))
        return float(self.costs.get(tactic, self.default_ms))

    def time(
        self,
        layer: Layer,
        tactic: str,
        run: Callable[[], object],
        abort_above_ms: float | None = None,
    ) -> list[float]:
        self.calls.append((layer.name, tactic))
        if self.execute:
            run()
        ms = self.cost(layer, tactic)
        samples = [ms] * min(PROBE_RUNS, self.iterations)
        if clearly_slower(samples, abort_above_ms):
            return samples
        return [ms] * self.iterations


def summarize(tactic: str, samples: list[float], iterations: int, note: str = "") -> TacticTiming:
    """A candidate's record: the median of its samples, aborted when it ran fewer runs."""
    return TacticTiming(
        tactic, float(statistics.median(samples)), len(samples), len(samples) < iterations, note
    )


# --------------------------------------------------------------------------- cache key


def _canonical(value: Any) -> Any:
    """JSON-able form of an attribute value (tensors by content hash, graphs by name)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray | ir.TensorProtocol):
        array = np.ascontiguousarray(value if isinstance(value, np.ndarray) else value.numpy())
        return {"dtype": str(array.dtype), "shape": list(array.shape), "sha256": _sha(array)}
    if isinstance(value, ir.Graph):
        return {"graph": value.name or "", "nodes": len(value)}
    return repr(value)


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(array.tobytes()).hexdigest()[:16]


def timing_key(layer: Layer, plan: Plan, device: Mapping[str, str]) -> dict[str, Any]:
    """What a layer's timings depend on (TensorRT's timing-cache key, readable).

    ``device`` is :func:`engine.device.device_identity` (CPU model, threads, library and
    engine versions). Weights' values are not part of the key, only whether an input is a
    constant (that decides which tactics apply).
    """
    attributes = {name: _canonical(layer.attrs.get(name)) for name in sorted(layer.attrs.names())}
    signature = json.dumps(attributes, sort_keys=True)
    inputs = []
    for name in layer.inputs:
        spec = plan.specs.get(name) if name else None
        if spec is None:
            inputs.append(None)
            continue
        shape = (
            None
            if spec.shape is None
            else [d if isinstance(d, int) else str(d) for d in spec.shape]
        )
        dtype = None if spec.dtype is None else spec.dtype.name
        inputs.append({"shape": shape, "dtype": dtype, "constant": name in plan.constants})
    epilogue = {k: attributes[k] for k in EPILOGUE_ATTRIBUTES if k in attributes}
    return {
        "op": layer.qualified_op,
        "opset": layer.context.opset,
        "attributes_sha256": hashlib.sha256(signature.encode()).hexdigest()[:16],
        "inputs": inputs,
        "precision": layer.precision.value,
        "epilogue": epilogue,
        "device": dict(sorted(device.items())),
    }


def key_digest(key: Mapping[str, Any]) -> str:
    """The cache's dictionary key: SHA-256 of the canonical JSON of a timing key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- cache file


class TimingCache:
    """Every candidate's timing and the winner per timing key, persisted as JSON at ``path``.

    File layout: ``{"format": "gie-timing-cache", "version": 1, "entries": {digest: {"key":
    {...}, "timings": [TacticTiming...], "winner": name}}}``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.warnings: list[str] = []
        self.entries: dict[str, dict[str, Any]] = {}
        self._dirty: set[str] = set()
        self.entries = self._read(report=True)

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, key: Mapping[str, Any]) -> tuple[list[TacticTiming], str] | None:
        """(all candidate timings, winner) stored for ``key``, or None."""
        entry = self.entries.get(key_digest(key))
        if entry is None:
            return None
        return [TacticTiming.from_json(t) for t in entry["timings"]], str(entry["winner"])

    def store(self, key: Mapping[str, Any], timings: list[TacticTiming], winner: str) -> None:
        """Record a layer's timings (in memory; :meth:`save` writes them)."""
        digest = key_digest(key)
        self.entries[digest] = {
            "key": dict(key),
            "timings": [t.to_json() for t in timings],
            "winner": winner,
        }
        self._dirty.add(digest)

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def save(self) -> None:
        """Merge this cache's new entries into the file under the lock and replace it
        atomically (entries written by other builds meanwhile are kept)."""
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            merged = self._read(report=False)
            merged.update({d: self.entries[d] for d in self._dirty})
            document = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": merged}
            handle, temp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as out:
                    json.dump(document, out, indent=1, sort_keys=True)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
        self.entries = {**merged, **self.entries}
        self._dirty.clear()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover - Windows
            yield
            return
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _read(self, report: bool) -> dict[str, dict[str, Any]]:
        """Entries on disk; a missing file is empty, a corrupt one is empty plus a warning."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as error:
            return self._corrupt(f"cannot be read ({error})", report)
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            return self._corrupt(f"is not valid JSON ({error})", report)
        if not isinstance(document, dict) or document.get("format") != CACHE_FORMAT:
            return self._corrupt("is not a GIE timing cache", report)
        if document.get("version") != CACHE_VERSION:
            return self._corrupt(f"has format version {document.get('version')!r}", report)
        entries = document.get("entries")
        if not isinstance(entries, dict) or not all(_valid_entry(e) for e in entries.values()):
            return self._corrupt("has malformed entries", report)
        return entries

    def _corrupt(self, why: str, report: bool) -> dict[str, dict[str, Any]]:
        message = f"timing cache {self.path} {why}; starting empty (it will be rewritten)"
        if report:
            self.warnings.append(message)
            LOGGER.warning(message)
        return {}


def _valid_entry(entry: Any) -> bool:
    try:
        [TacticTiming.from_json(t) for t in entry["timings"]]
        return isinstance(entry["winner"], str) and isinstance(entry["key"], dict)
    except (KeyError, TypeError, ValueError):
        return False


__all__ = [
    "PROBE_RUNS",
    "FakeTimer",
    "Timer",
    "TimingCache",
    "WallClockTimer",
    "clearly_slower",
    "key_digest",
    "summarize",
    "timing_key",
]

"""GPU timing for tactic selection: CUDA events, warm-up, median, L2 flush, early abort.

:class:`CudaEventTimer` implements the selector's :class:`~engine.build.timing.Timer`
protocol on a GPU: ``warmup`` untimed runs, then up to ``iterations`` samples, each the time
between two CUDA events recorded around one run on the current stream (milliseconds, the
events' own resolution is about 0.5 us). With ``flush_l2`` a buffer larger than the L2 cache
is overwritten before every sample, so each run starts with cold caches as it would inside a
whole network. Like :class:`~engine.build.timing.WallClockTimer`, a candidate whose warm-up
run exceeds :data:`~engine.build.timing.WARMUP_ABORT_FACTOR` times the abort limit is
abandoned at once, and one whose first :data:`~engine.build.timing.PROBE_RUNS` samples are all
above the limit stops there.

The clock is injectable (:class:`EventClock`): the default, :class:`CupyEventClock`, imports
CuPy only when created, so this module imports without it; tests pass a fake clock.

:func:`cuda_timing_key` extends :func:`~engine.build.timing.timing_key` with the GPU
(name, compute capability, SM count), the driver / CUDA runtime / NVRTC / CuPy versions and the
tactic catalogue version, so a timing cache never answers for another GPU or software stack.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

from engine.backends.cuda.device_info import DeviceInfo
from engine.backends.cuda.tactics import CATALOGUE_VERSION
from engine.build.plan import Layer, Plan
from engine.build.timing import PROBE_RUNS, WARMUP_ABORT_FACTOR, clearly_slower, timing_key
from engine.device import device_identity


class EventClock(Protocol):
    """Times GPU work: ``elapsed_ms(run)`` enqueues ``run`` between two events and returns the
    milliseconds between them once they completed; ``flush_l2()`` evicts the L2 cache."""

    def elapsed_ms(self, run: Callable[[], object]) -> float: ...

    def flush_l2(self) -> None: ...


class CupyEventClock:
    """CUDA events on CuPy's current stream; the L2 flush writes ``flush_bytes`` (default
    twice the device's L2, at least 64 MiB) with a device memset."""

    def __init__(self, device: DeviceInfo | None = None, flush_bytes: int | None = None) -> None:
        import cupy  # type: ignore[import-not-found]

        self._cupy = cupy
        l2 = device.l2_bytes if device is not None else 0
        self.flush_bytes = flush_bytes or max(2 * l2, 64 << 20)
        self._scratch: Any = None
        self._value = 0

    def elapsed_ms(self, run: Callable[[], object]) -> float:
        cuda = self._cupy.cuda
        start, end = cuda.Event(), cuda.Event()
        start.record()
        run()
        end.record()
        end.synchronize()
        return float(cuda.get_elapsed_time(start, end))

    def flush_l2(self) -> None:
        if self._scratch is None:
            self._scratch = self._cupy.empty(self.flush_bytes, dtype=self._cupy.uint8)
        self._value = (self._value + 1) % 256  # a new value each time: no write is elided
        self._scratch.fill(self._value)


class CudaEventTimer:
    """The Timer protocol with CUDA events (see the module docstring).

    ``clock`` defaults to a :class:`CupyEventClock` made on first use (CuPy needed then, not
    at construction). ``flush_l2`` flushes before every timed sample (not before warm-ups).
    """

    def __init__(
        self,
        warmup: int = 2,
        iterations: int = 10,
        flush_l2: bool = False,
        clock: EventClock | None = None,
        device: DeviceInfo | None = None,
    ) -> None:
        if iterations < 1 or warmup < 0:
            raise ValueError("need iterations >= 1 and warmup >= 0")
        self.warmup = warmup
        self.iterations = iterations
        self.flush_l2 = flush_l2
        self.device = device
        self._clock = clock

    @property
    def clock(self) -> EventClock:
        if self._clock is None:
            self._clock = CupyEventClock(self.device)
        return self._clock

    def time(
        self,
        layer: Layer,
        tactic: str,
        run: Callable[[], object],
        abort_above_ms: float | None = None,
    ) -> list[float]:
        """Per-run latencies (ms); fewer than ``iterations`` when abandoned early."""
        clock = self.clock
        fastest_warmup = math.inf
        for _ in range(self.warmup):
            fastest_warmup = min(fastest_warmup, clock.elapsed_ms(run))
        if (
            math.isfinite(fastest_warmup)
            and abort_above_ms is not None
            and fastest_warmup > WARMUP_ABORT_FACTOR * abort_above_ms
        ):
            return [fastest_warmup]  # hopeless already in warm-up
        samples: list[float] = []
        for _ in range(self.iterations):
            if self.flush_l2:
                clock.flush_l2()
            samples.append(clock.elapsed_ms(run))
            if len(samples) == PROBE_RUNS and clearly_slower(samples, abort_above_ms):
                break
        return samples


def device_key(device: DeviceInfo) -> dict[str, str]:
    """The GPU part of a timing key: device, compute capability, SM count, software versions
    and the tactic catalogue version (plus the engine's own identity entries)."""
    identity = device_identity("cuda")
    identity.update(
        {
            "device": device.name,
            "compute_capability": f"{device.compute_capability[0]}.{device.compute_capability[1]}",
            "sm_count": str(device.sm_count),
            "driver": device.driver_version,
            "cuda_runtime": device.runtime_version,
            "nvrtc": device.nvrtc_version,
            "cupy": device.cupy_version,
            "tactic_catalogue": CATALOGUE_VERSION,
        }
    )
    # The host CPU and its thread count do not change GPU timings.
    for host_only in ("machine", "threads"):
        identity.pop(host_only, None)
    return identity


def cuda_timing_key(layer: Layer, plan: Plan, device: DeviceInfo) -> dict[str, Any]:
    """The timing-cache key of ``layer`` on ``device`` (engine.build.timing.TimingCache)."""
    return timing_key(layer, plan, device_key(device))


__all__ = ["CudaEventTimer", "CupyEventClock", "EventClock", "cuda_timing_key", "device_key"]

"""Streams for a launch plan: which steps may overlap, and the events that order the rest.

Two steps conflict when one writes bytes the other reads or writes (read-after-write,
write-after-read, write-after-write, over the four memory regions). A step runs after every
earlier step it conflicts with; that is the only ordering the plan needs, and it covers memory
reuse too (a slot the memory plan hands to a later value is written only after the last reader
of the earlier value finished, whatever stream that reader ran on).

Assignment is greedy in program order: a step continues the stream whose last step it depends
on (latest first); a step with no such stream takes the least recently used one, so independent
branches (an Inception block, the two heads of a detector) spread over ``max_streams`` streams.
A dependency on another stream becomes an event recorded after the producer and a wait before
the consumer, unless an earlier wait on the same stream already covers it. Host steps (NumPy
fallbacks) synchronize everything; the executor handles them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.backends.cuda.launch_plan import DeviceBuffer, HostStep, Step


def _spans(buffers: Sequence[DeviceBuffer]) -> list[tuple[str, int, int]]:
    return [b.span() for b in buffers if b.nbytes > 0]


def _hit(a: list[tuple[str, int, int]], b: list[tuple[str, int, int]]) -> bool:
    return any(ra == rb and sa < eb and sb < ea for ra, sa, ea in a for rb, sb, eb in b)


def dependencies(steps: Sequence[Step]) -> list[list[int]]:
    """For every step, the earlier steps it conflicts with (see the module docstring)."""
    reads = [_spans(s.reads) for s in steps]
    writes = [_spans(s.writes) for s in steps]
    deps: list[list[int]] = []
    for j in range(len(steps)):
        found = []
        for i in range(j):
            if (
                isinstance(steps[i], HostStep)
                or isinstance(steps[j], HostStep)
                or (
                    _hit(writes[i], reads[j])
                    or _hit(writes[i], writes[j])
                    or _hit(reads[i], writes[j])
                )
            ):
                found.append(i)
        deps.append(found)
    return deps


@dataclass
class Schedule:
    """``stream[j]``: the stream of step j; ``waits[j]``: earlier steps on other streams whose
    events step j's stream waits for; ``recorded``: the steps that record an event."""

    stream: list[int]
    waits: list[list[int]]
    streams: int
    recorded: set[int] = field(default_factory=set)

    def cross_stream_waits(self) -> int:
        return sum(len(w) for w in self.waits)


def schedule(steps: Sequence[Step], max_streams: int = 1) -> Schedule:
    """Assign streams and events (see the module docstring); one stream gives program order."""
    if max_streams < 1:
        raise ValueError("max_streams must be at least 1")
    deps = dependencies(steps) if max_streams > 1 else [[] for _ in steps]
    last_on: list[int] = []  # last step index per stream
    used_at: list[int] = []  # when each stream was last used (step index)
    covered: list[dict[int, int]] = []  # per stream: other stream -> latest step waited for
    stream_of: list[int] = []
    waits: list[list[int]] = []
    recorded: set[int] = set()
    for j, step in enumerate(steps):
        tails = [s for s in range(len(last_on)) if last_on[s] in deps[j]]
        if isinstance(step, HostStep) or max_streams == 1:
            chosen = 0
        elif tails:
            chosen = max(tails, key=lambda s: last_on[s])
        elif len(last_on) < max_streams:
            chosen = len(last_on)
        else:
            chosen = min(range(len(last_on)), key=lambda s: used_at[s])
        if chosen == len(last_on):
            last_on.append(-1)
            used_at.append(-1)
            covered.append({})
        mine: list[int] = []
        by_stream: dict[int, int] = {}
        for i in deps[j]:
            s = stream_of[i]
            if s != chosen:
                by_stream[s] = max(by_stream.get(s, -1), i)
        for s, i in sorted(by_stream.items()):
            if covered[chosen].get(s, -1) < i:
                mine.append(i)
                recorded.add(i)
                covered[chosen][s] = i
        stream_of.append(chosen)
        waits.append(mine)
        last_on[chosen] = j
        used_at[chosen] = j
    return Schedule(stream_of, waits, max(1, len(last_on)), recorded)


__all__ = ["Schedule", "dependencies", "schedule"]

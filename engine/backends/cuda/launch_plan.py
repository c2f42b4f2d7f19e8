"""The launch plan: what a CUDA engine does at one set of input shapes, as data.

Lowering (:mod:`engine.backends.cuda.lowering`) turns every layer of a built Plan into
:class:`Step` records; a device (:mod:`engine.backends.cuda.devices`: CuPy on a GPU, the CPU
shim without one) executes them (:mod:`engine.backends.cuda.executor`). Nothing here touches a
GPU, so the whole plan (kernels, grids, arguments, memory offsets, stream assignment) is
inspectable and testable on any machine.

Device memory is four regions, each one allocation made once per engine and shape set:

``weights``  every constant the kernels read, uploaded once, already in the layout the kernel
             wants (a conv weight as KRSC, a transposed GEMM weight ...);
``arena``    every activation, at the offsets of the engine's MemoryPlan;
``io``       the graph inputs (copied in before a run);
``scratch``  what the memory plan does not hold: layout copies (NCHW <-> NHWC), per-layer
             temporaries and values the plan left outside the arena, placed by
             :class:`ScratchAllocator` by lifetime.

A :class:`DeviceBuffer` is a typed view of one region (offset in bytes, dtype, shape, layout).
Layouts: ``"plain"`` is the ONNX logical layout; ``"nhwc"`` is a 4-D NCHW tensor stored as
N, H, W, C (what the convolution and pooling kernels read and write); its ``shape`` stays the
logical NCHW shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

REGIONS = ("weights", "arena", "io", "scratch")
LAYOUTS = ("plain", "nhwc")
#: Offsets in every region are multiples of this (bytes): enough for 16-byte vector loads and
#: cp.async, and a multiple of the memory plan's 64.
ALIGNMENT = 256

Dims = tuple[int, int, int]


def align_up(size: int, alignment: int = ALIGNMENT) -> int:
    return -(-size // alignment) * alignment


@dataclass(frozen=True)
class DeviceBuffer:
    """A typed view of device memory: ``region`` + ``offset`` bytes, ``shape`` (logical),
    ``dtype`` (a NumPy dtype name) and ``layout`` (see the module docstring)."""

    region: str
    offset: int
    dtype: str
    shape: tuple[int, ...]
    layout: str = "plain"

    def __post_init__(self) -> None:
        if self.region not in REGIONS:
            raise ValueError(f"unknown memory region {self.region!r}; known: {REGIONS}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; known: {LAYOUTS}")
        if self.layout == "nhwc" and len(self.shape) != 4:
            raise ValueError(f"an nhwc buffer must be 4-D, got shape {list(self.shape)}")

    @property
    def size(self) -> int:
        """Elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape in memory order (N, H, W, C for nhwc)."""
        if self.layout == "nhwc":
            n, c, h, w = self.shape
            return (n, h, w, c)
        return self.shape

    def span(self) -> tuple[str, int, int]:
        """(region, first byte, end byte) for hazard analysis."""
        return self.region, self.offset, self.offset + self.nbytes

    def with_shape(self, shape: tuple[int, ...]) -> DeviceBuffer:
        """The same bytes seen with another logical shape (reshapes); plain layout only."""
        if int(np.prod(shape, dtype=np.int64)) != self.size or self.layout != "plain":
            raise ValueError(f"cannot view {self.describe()} as {list(shape)}")
        return DeviceBuffer(self.region, self.offset, self.dtype, tuple(shape))

    def describe(self) -> str:
        layout = "" if self.layout == "plain" else f" {self.layout}"
        return f"{self.dtype}{list(self.shape)}{layout} @{self.region}+{self.offset}"


@dataclass(frozen=True)
class KernelSource:
    """Where a kernel comes from: a file under kernels/ or generated text, plus -D defines."""

    file: str | None = None
    text: str | None = None
    defines: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if (self.file is None) == (self.text is None):
            raise ValueError("a kernel source is either a kernels/ file or generated text")

    @property
    def label(self) -> str:
        return self.file or "generated"

    def source_text(self) -> str:
        if self.file is not None:
            from engine.backends.cuda.nvrtc import KERNEL_DIR

            return (KERNEL_DIR / self.file).read_text()
        return self.text or ""

    def const_pointers(self, entry: str) -> list[bool]:
        """Per parameter of ``entry``: whether it is ``const`` (read only); KeyError when the
        source has no such entry point."""
        text = self.source_text()
        marker = text.find(f" {entry}(")
        if marker < 0:
            marker = text.find(f"{entry}(")
        if marker < 0:
            raise KeyError(f"kernel {self.label} has no entry point {entry}")
        start = text.index("(", marker) + 1
        end = text.index(")", start)
        return ["const" in p for p in text[start:end].split(",") if p.strip()]

    def options(self) -> list[str]:
        return [f"-D{name}={value}" for name, value in self.defines]


def overlaps(a: DeviceBuffer, b: DeviceBuffer) -> bool:
    """Whether two buffers share bytes (same region, intersecting byte ranges)."""
    ra, sa, ea = a.span()
    rb, sb, eb = b.span()
    return ra == rb and sa < eb and sb < ea


Argument = DeviceBuffer | int | float | None


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch. ``reads``/``writes`` are the buffers it may read or write (from the
    entry point's ``const`` pointers); ``shared_bytes`` is dynamic shared memory."""

    source: KernelSource
    entry: str
    grid: Dims
    block: Dims
    args: tuple[Argument, ...]
    reads: tuple[DeviceBuffer, ...]
    writes: tuple[DeviceBuffer, ...]
    shared_bytes: int = 0

    def describe(self) -> str:
        return f"{self.entry}<<<{list(self.grid)}, {list(self.block)}>>> ({self.source.label})"

    def aliasing(self) -> tuple[DeviceBuffer, DeviceBuffer] | None:
        """A (written, read) pair of different views of overlapping bytes, if any: a kernel
        may update a buffer in place only through the very same view."""
        for written in self.writes:
            for read in self.reads:
                if read != written and overlaps(read, written):
                    return written, read
        return None


@dataclass(frozen=True)
class CopyStep:
    """A device-to-device copy of ``src`` into ``dst`` (equal byte sizes): reshapes, identity."""

    src: DeviceBuffer
    dst: DeviceBuffer

    @property
    def reads(self) -> tuple[DeviceBuffer, ...]:
        return (self.src,)

    @property
    def writes(self) -> tuple[DeviceBuffer, ...]:
        return (self.dst,)

    def describe(self) -> str:
        return f"copy {self.src.describe()} -> {self.dst.describe()}"


@dataclass(frozen=True)
class HostStep:
    """A layer no CUDA kernel runs: its inputs are downloaded, the NumPy kernel runs on the
    host, its outputs are uploaded (plain layout). Breaks CUDA-graph capture."""

    kernel: Callable[[list[Any], Any, Any], Any]
    attrs: Any
    context: Any
    inputs: tuple[DeviceBuffer | None, ...]
    outputs: tuple[DeviceBuffer | None, ...]
    reason: str

    @property
    def reads(self) -> tuple[DeviceBuffer, ...]:
        return tuple(b for b in self.inputs if b is not None)

    @property
    def writes(self) -> tuple[DeviceBuffer, ...]:
        return tuple(b for b in self.outputs if b is not None)

    def describe(self) -> str:
        return f"host fallback ({self.reason})"


@dataclass(frozen=True)
class LibraryGemm:
    """A cuBLAS GEMM (gemmEx / gemmStridedBatchedEx) on row-major operands, ``batch`` times:
    ``c[z] = alpha * a[z] @ b[z] + beta * c[z]`` with a [m, k] (lda), b [k, n] (ldb), c [m, n]
    (ldc), batch strides in elements (0: shared operand). ``compute``: "fp32", "tf32" (fp32 data,
    TF32 tensor-core math), "fp16" (fp16 data, fp32 accumulation), "int8" (int8 data, exact
    int32 accumulator and output)."""

    a: DeviceBuffer
    b: DeviceBuffer
    c: DeviceBuffer
    m: int
    n: int
    k: int
    batch: int
    lda: int
    ldb: int
    ldc: int
    stride_a: int
    stride_b: int
    stride_c: int
    alpha: float
    beta: float
    compute: str

    @property
    def reads(self) -> tuple[DeviceBuffer, ...]:
        return (self.a, self.b, self.c) if self.beta else (self.a, self.b)

    @property
    def writes(self) -> tuple[DeviceBuffer, ...]:
        return (self.c,)

    def describe(self) -> str:
        return f"cuBLAS {self.compute} GEMM {self.m}x{self.n}x{self.k} x{self.batch}"


Step = KernelLaunch | CopyStep | HostStep | LibraryGemm


@dataclass
class LayerSteps:
    """The steps of one layer (conversions it needed included), in order."""

    index: int
    name: str
    op: str
    tactic: str
    steps: list[Step] = field(default_factory=list)
    #: Where the layer's input and output values are stored while it runs (not constants).
    values: dict[str, DeviceBuffer] = field(default_factory=dict)


@dataclass
class LaunchPlan:
    """Everything a device needs to run the engine at ``input_shapes`` (see the module
    docstring). ``weights`` pairs each weight buffer with the host array uploaded into it."""

    input_shapes: dict[str, tuple[int, ...]]
    layers: list[LayerSteps]
    region_bytes: dict[str, int]
    weights: list[tuple[DeviceBuffer, np.ndarray]]
    inputs: dict[str, DeviceBuffer]
    outputs: dict[str, DeviceBuffer]
    notes: list[str] = field(default_factory=list)
    #: Values folded to constants at these shapes (Shape and what follows from it).
    host_values: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def steps(self) -> list[Step]:
        return [step for layer in self.layers for step in layer.steps]

    @property
    def host_layers(self) -> list[str]:
        """Layers that fall back to the host (their reasons are in ``notes``)."""
        return [
            layer.name
            for layer in self.layers
            if any(isinstance(step, HostStep) for step in layer.steps)
        ]

    @property
    def graph_capturable(self) -> bool:
        """Whether the whole run can be captured as one CUDA graph (no host step)."""
        return not self.host_layers

    def kernel_count(self) -> int:
        return sum(isinstance(step, KernelLaunch) for step in self.steps)

    def summary(self) -> str:
        total = sum(self.region_bytes.values())
        return (
            f"{len(self.layers)} layers -> {self.kernel_count()} kernel launches, "
            f"{sum(isinstance(s, CopyStep) for s in self.steps)} copies, "
            f"{len(self.host_layers)} host layers; device memory {total} bytes "
            + ", ".join(f"{k} {v}" for k, v in self.region_bytes.items())
        )


class ScratchAllocator:
    """First-fit placement of scratch buffers by lifetime (layer indices, inclusive): two
    buffers share bytes only when their lifetimes do not overlap. Offsets are aligned."""

    def __init__(self) -> None:
        self._placed: list[tuple[int, int, int, int]] = []  # (offset, end, first, last)
        self.size = 0

    def allocate(self, nbytes: int, first: int, last: int) -> int:
        nbytes = align_up(max(nbytes, 1))
        busy = sorted(
            (offset, end) for offset, end, a, b in self._placed if a <= last and first <= b
        )
        offset = 0
        for start, end in busy:
            if offset + nbytes <= start:
                break
            offset = max(offset, align_up(end))
        self._placed.append((offset, offset + nbytes, first, last))
        self.size = max(self.size, offset + nbytes)
        return offset


__all__ = [
    "ALIGNMENT",
    "CopyStep",
    "DeviceBuffer",
    "HostStep",
    "KernelLaunch",
    "KernelSource",
    "LaunchPlan",
    "LayerSteps",
    "LibraryGemm",
    "ScratchAllocator",
    "Step",
    "align_up",
]

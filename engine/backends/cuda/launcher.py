"""Load a compiled kernel on the GPU and launch it with checked arguments.

:class:`CudaModule` wraps one :class:`~engine.backends.cuda.nvrtc.CompileResult` (CUBIN, or PTX
that the driver JITs) and the source it came from: the source's ``extern "C" __global__``
signatures (parsed as the CPU shim does, :func:`engine.backends.cuda.shim_runner.entry_points`)
say what every argument must be. :func:`pack_arguments` turns Python values into the exact
kernel parameter types, refusing mismatches before anything reaches the driver:

* pointer parameters take a device array (CuPy ``ndarray``-like: ``dtype``, ``flags``,
  ``data.ptr``), C-contiguous, of the pointee's dtype; ``None`` is a null pointer; a raw device
  address may be passed as :class:`DevicePointer`. Host NumPy arrays are refused.
* scalars take Python/NumPy numbers that fit the C type (``int`` range-checked; integers only
  for integer parameters) and become NumPy scalars of that width (CuPy would otherwise pass a
  Python int as 64 bits).

The CuPy calls (``cupy.cuda.Module.load`` + ``get_function`` + the launch) are behind
:func:`cupy_function`; CuPy is imported there only, so this module imports without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.backends.cuda.nvrtc import CompileResult
from engine.backends.cuda.shim_runner import EntryPoint, Parameter, entry_points

#: C scalar type -> NumPy scalar type passed to the kernel.
SCALAR_TYPES: dict[str, type[np.generic]] = {
    "int": np.int32,
    "unsigned": np.uint32,
    "unsigned int": np.uint32,
    "long long": np.int64,
    "float": np.float32,
    "double": np.float64,
}

#: Pointee C type -> dtype of the device array passed for it.
POINTEE_DTYPES: dict[str, np.dtype] = {
    "float": np.dtype(np.float32),
    "gie_half": np.dtype(np.float16),
    "double": np.dtype(np.float64),
    "int": np.dtype(np.int32),
    "unsigned": np.dtype(np.uint32),
    "long long": np.dtype(np.int64),
    "signed char": np.dtype(np.int8),
    # The width-generic data-movement kernels (kernels/data_movement.cu, suffixes b1..b8).
    "unsigned char": np.dtype(np.uint8),
    "unsigned short": np.dtype(np.uint16),
    "unsigned long long": np.dtype(np.uint64),
    "int8_t": np.dtype(np.int8),
}

#: Largest block (threads) and grid y/z extents CUDA allows.
MAX_BLOCK_THREADS = 1024
MAX_GRID_YZ = 65535
MAX_GRID_X = 2**31 - 1

#: A loaded kernel: ``function(grid, block, args, shared_bytes, stream)``.
Dims = tuple[int, int, int]
LaunchFunction = Callable[[Dims, Dims, tuple[Any, ...], int, Any], None]


#: Dynamic shared memory (bytes) a kernel may use without opting in.
STATIC_SHARED_LIMIT = 48 * 1024


class LaunchError(ValueError):
    """A launch's arguments or dimensions do not fit the kernel (nothing was launched)."""


@dataclass(frozen=True)
class DevicePointer:
    """A raw device address (bytes) for a pointer parameter, e.g. an offset into the arena."""

    address: int


def _pointer(entry: str, parameter: Parameter, value: Any) -> np.uint64:
    if value is None:
        return np.uint64(0)
    if isinstance(value, DevicePointer):
        if value.address < 0:
            raise LaunchError(f"{entry}: {parameter.name} is a negative address")
        return np.uint64(value.address)
    if isinstance(value, np.ndarray):
        raise LaunchError(f"{entry}: {parameter.name} got a host NumPy array; pass device memory")
    if not all(hasattr(value, a) for a in ("dtype", "flags", "data")):
        raise LaunchError(f"{entry}: {parameter.name} needs a device array, got {type(value)}")
    wanted = POINTEE_DTYPES.get(parameter.base_type)
    if wanted is None:
        raise LaunchError(f"{entry}: pointer type {parameter.base_type!r} is not supported")
    if np.dtype(value.dtype) != wanted or not value.flags.c_contiguous:
        raise LaunchError(
            f"{entry}: {parameter.name} needs a C-contiguous {wanted} array, got "
            f"{np.dtype(value.dtype)} (contiguous={bool(value.flags.c_contiguous)})"
        )
    return np.uint64(int(value.data.ptr))


def _scalar(entry: str, parameter: Parameter, value: Any) -> np.generic:
    kind = SCALAR_TYPES.get(parameter.base_type)
    if kind is None:
        raise LaunchError(f"{entry}: scalar type {parameter.base_type!r} is not supported")
    if isinstance(value, bool | np.bool_) or value is None:
        raise LaunchError(f"{entry}: {parameter.name} needs a number, got {value!r}")
    if np.issubdtype(kind, np.integer):
        if not isinstance(value, int | np.integer):
            raise LaunchError(f"{entry}: {parameter.name} ({parameter.base_type}) got {value!r}")
        info = np.iinfo(kind)
        if not info.min <= int(value) <= info.max:
            raise LaunchError(
                f"{entry}: {parameter.name} = {value} overflows {parameter.base_type}"
            )
        return kind(int(value))
    if not isinstance(value, int | float | np.integer | np.floating):
        raise LaunchError(f"{entry}: {parameter.name} ({parameter.base_type}) got {value!r}")
    return kind(value)


def pack_arguments(entry: EntryPoint, args: Sequence[Any]) -> tuple[Any, ...]:
    """The kernel arguments as CuPy passes them (NumPy scalars of the parameter widths);
    :class:`LaunchError` names the first argument that does not fit."""
    if len(args) != len(entry.parameters):
        raise LaunchError(f"{entry.name} takes {len(entry.parameters)} arguments, got {len(args)}")
    return tuple(
        _pointer(entry.name, p, v) if p.pointer else _scalar(entry.name, p, v)
        for p, v in zip(entry.parameters, args)
    )


def launch_dims(numbers: Sequence[int] | int, what: str) -> tuple[int, int, int]:
    """1 to 3 positive extents padded with 1s."""
    values = [int(numbers)] if isinstance(numbers, int | np.integer) else [int(n) for n in numbers]
    if not 1 <= len(values) <= 3 or any(v < 1 for v in values):
        raise LaunchError(f"{what} must be 1 to 3 positive extents, got {numbers!r}")
    x, y, z = [*values, 1, 1][:3]
    return x, y, z


def check_launch(
    grid: Sequence[int] | int, block: Sequence[int] | int
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Grid and block as 3-tuples, refused when CUDA would refuse them."""
    grid3, block3 = launch_dims(grid, "grid"), launch_dims(block, "block")
    if block3[0] * block3[1] * block3[2] > MAX_BLOCK_THREADS:
        raise LaunchError(f"block {block3} has more than {MAX_BLOCK_THREADS} threads")
    if grid3[0] > MAX_GRID_X or max(grid3[1:]) > MAX_GRID_YZ:
        raise LaunchError(f"grid {grid3} exceeds ({MAX_GRID_X}, {MAX_GRID_YZ}, {MAX_GRID_YZ})")
    return grid3, block3


def cupy_function(binary: bytes, entry: str) -> LaunchFunction:
    """Load ``binary`` (CUBIN or PTX) with ``cupy.cuda.Module`` and return a launcher of
    ``entry`` (the only code here that touches the GPU)."""
    import cupy  # type: ignore[import-not-found]

    module = cupy.cuda.Module()
    module.load(binary)
    function = module.get_function(entry)

    raised = [STATIC_SHARED_LIMIT]

    def launch(grid: Any, block: Any, args: tuple[Any, ...], shared: int, stream: Any) -> None:
        if shared > raised[0]:  # above 48 KB a kernel must opt in to dynamic shared memory
            function.max_dynamic_shared_size_bytes = shared
            raised[0] = shared
        function(grid, block, args, shared_mem=shared, stream=stream)

    launch.module = module  # type: ignore[attr-defined] - keep the module loaded
    return launch


class CudaModule:
    """A compiled source on the GPU; ``launch(entry, grid, block, args)`` runs one kernel.

    ``loader(binary, entry)`` makes the launch function (default :func:`cupy_function`;
    tests pass a recorder). Functions are loaded on first use and kept.
    """

    def __init__(
        self,
        result: CompileResult,
        source: str,
        loader: Callable[[bytes, str], LaunchFunction] | None = None,
    ) -> None:
        self.result = result
        self.entries = {e.name: e for e in entry_points(source)}
        self._loader = loader or cupy_function
        self._functions: dict[str, LaunchFunction] = {}

    def prepare(self, entry: str) -> None:
        """Load ``entry``'s function now (it is otherwise loaded at its first launch)."""
        if entry not in self.entries:
            known = sorted(self.entries)
            raise LaunchError(f"{self.result.name} has no kernel {entry!r}; it has {known}")
        if entry not in self._functions:
            self._functions[entry] = self._loader(self.result.binary, entry)

    def launch(
        self,
        entry: str,
        grid: Sequence[int] | int,
        block: Sequence[int] | int,
        args: Sequence[Any],
        shared_bytes: int = 0,
        stream: Any = None,
    ) -> None:
        """Validate everything, then launch ``entry`` (asynchronously, on ``stream``)."""
        if entry not in self.entries:
            known = sorted(self.entries)
            raise LaunchError(f"{self.result.name} has no kernel {entry!r}; it has {known}")
        packed = pack_arguments(self.entries[entry], args)
        grid3, block3 = check_launch(grid, block)
        if shared_bytes < 0:
            raise LaunchError(f"shared_bytes must be >= 0, got {shared_bytes}")
        function = self._functions.get(entry)
        if function is None:
            function = self._functions[entry] = self._loader(self.result.binary, entry)
        function(grid3, block3, packed, shared_bytes, stream)


__all__ = [
    "CudaModule",
    "DevicePointer",
    "LaunchError",
    "check_launch",
    "cupy_function",
    "launch_dims",
    "pack_arguments",
]

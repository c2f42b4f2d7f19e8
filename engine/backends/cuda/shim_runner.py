"""Run a CUDA kernel source on the CPU: g++ + the CPU shim header + ctypes.

:func:`build` compiles a kernel source (a ``kernels/*.cu`` file or generated pointwise source)
with ``shim/gie_cpu_shim.h`` force-included into a shared library, adding one launcher per
``extern "C" __global__`` entry point::

    extern "C" void gie_launch_<entry>(const unsigned* launch, void** args)

``launch`` is grid x, y, z then block x, y, z; ``args`` points at each parameter's value, as
``cuLaunchKernel``'s kernelParams do. Libraries are cached by the SHA-256 of the source, the
shim and prelude headers, the flags and the compiler version, in a folder passed in (default
``~/.cache/gie-studio/shim``). :meth:`ShimLibrary.launch` checks every NumPy buffer against the
parameter's pointer type before the call; kernels write their outputs in place.

Dynamic shared memory: a function-scope ``extern __shared__ [__align__(n)] T name[];`` is
rewritten to ``T* name = reinterpret_cast<T*>(gie_shim::dynamic_shared());`` and
``launch(..., shared_bytes=)`` sizes the per-block buffer (as cuLaunchKernel's sharedMemBytes).
``deferred_cp_async=True`` makes cp.async land only at the wait that covers it (see the shim).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.backends.cuda.nvrtc import KERNEL_DIR

SHIM_HEADER = Path(__file__).resolve().parent / "shim" / "gie_cpu_shim.h"
COMPILER = "g++"
#: ``-fno-gnu-unique``: ``__shared__`` is ``static`` under the shim, and g++ would make the
#: statics of template kernels process-wide unique symbols, so two libraries of one kernel
#: compiled with different tile defines would share (and overflow) one tile buffer.
FLAGS = ("-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", "-fno-gnu-unique")

#: Scalar parameter types and their ctypes.
_SCALARS: dict[str, Any] = {
    "int": ctypes.c_int,
    "unsigned": ctypes.c_uint,
    "unsigned int": ctypes.c_uint,
    "long long": ctypes.c_longlong,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
}

#: Pointee types and the NumPy dtype a buffer passed for them must have.
_POINTEES: dict[str, np.dtype] = {
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
}


class ShimError(RuntimeError):
    """g++ refused the kernel with the shim, or a launch got the wrong arguments."""


@dataclass(frozen=True)
class Parameter:
    """One kernel parameter: its C type without qualifiers, and whether it is a pointer."""

    name: str
    base_type: str
    pointer: bool

    @property
    def c_type(self) -> str:
        return f"{self.base_type}*" if self.pointer else self.base_type


@dataclass(frozen=True)
class EntryPoint:
    name: str
    parameters: tuple[Parameter, ...]


_ENTRY = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)'
)


_DYNAMIC_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?"
    r"((?:const\s+|unsigned\s+|signed\s+)*\w+)\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?"
    r"(\w+)\s*\[\s*\]\s*(?:__align__\s*\(\s*\d+\s*\)\s*)?;"
)


def rewrite_dynamic_shared(source: str) -> str:
    """``extern __shared__ T name[];`` -> a pointer to the launch's dynamic shared memory."""
    return _DYNAMIC_SHARED.sub(
        lambda m: (
            f"{m.group(1)}* {m.group(2)} = "
            f"reinterpret_cast<{m.group(1)}*>(gie_shim::dynamic_shared());"
        ),
        source,
    )


def _parameter(text: str) -> Parameter:
    words = text.replace("*", " * ").replace("__restrict__", " ").split()
    words = [w for w in words if w != "const"]
    name = words[-1]
    pointer = "*" in words
    base = " ".join(w for w in words[:-1] if w != "*")
    if pointer and base not in _POINTEES:
        raise ShimError(f"parameter {text.strip()!r}: pointer type {base!r} is not supported")
    if not pointer and base not in _SCALARS:
        raise ShimError(f"parameter {text.strip()!r}: scalar type {base!r} is not supported")
    return Parameter(name, base, pointer)


def entry_points(source: str) -> list[EntryPoint]:
    """Every ``extern "C" __global__`` function of a source, with its parameters."""
    found = []
    for match in _ENTRY.finditer(source):
        params = [p for p in match.group(2).split(",") if p.strip()]
        found.append(EntryPoint(match.group(1), tuple(_parameter(p) for p in params)))
    return found


def launcher_source(entries: Sequence[EntryPoint]) -> str:
    """C++ launchers (one per entry point) appended to the kernel source."""
    parts = []
    for entry in entries:
        args = ", ".join(
            f"*reinterpret_cast<{p.c_type}*>(args[{i}])" for i, p in enumerate(entry.parameters)
        )
        parts.append(
            f'extern "C" void gie_launch_{entry.name}(const unsigned* launch, void** args) {{\n'
            f"    gie_shim::launch(dim3{{launch[0], launch[1], launch[2]}},\n"
            f"                     dim3{{launch[3], launch[4], launch[5]}},\n"
            f"                     [&] {{ {entry.name}({args}); }});\n}}\n"
        )
    parts.append(
        'extern "C" void gie_shim_set_barrier_timeout_ms(unsigned milliseconds) {\n'
        "    gie_shim::barrier_timeout_ms = milliseconds;\n}\n"
    )
    parts.append(
        'extern "C" void gie_shim_set_dynamic_shared_bytes(unsigned bytes) {\n'
        "    gie_shim::dynamic_shared_bytes = bytes;\n}\n"
        'extern "C" void gie_shim_set_deferred_cp_async(int on) {\n'
        "    gie_shim::deferred_cp_async = on != 0;\n}\n"
    )
    return "\n// ---- launchers (engine/backends/cuda/shim_runner.py)\n" + "\n".join(parts)


def compiler_available() -> str | None:
    """None when g++ with C++20 can build shim libraries here, else the reason."""
    if shutil.which(COMPILER) is None:
        return f"{COMPILER} is not on PATH (the CPU shim needs a C++20 compiler)"
    return None


def _compiler_version() -> str:
    result = subprocess.run([COMPILER, "--version"], capture_output=True, text=True, check=False)
    return result.stdout.splitlines()[0] if result.stdout else ""


def default_cache_dir() -> Path:
    """``~/.cache/gie-studio/shim``."""
    return Path.home() / ".cache" / "gie-studio" / "shim"


class ShimLibrary:
    """A compiled kernel source; :meth:`launch` runs one entry point on NumPy buffers."""

    def __init__(self, path: Path, entries: Sequence[EntryPoint], name: str) -> None:
        self.path = path
        self.name = name
        self.entries = {e.name: e for e in entries}
        self._library = ctypes.CDLL(str(path))

    def set_barrier_timeout(self, seconds: float) -> None:
        """Abort the process (with a message on stderr) when a barrier waits this long: a
        deadlocked kernel fails fast instead of hanging (default 20 s)."""
        self._library.gie_shim_set_barrier_timeout_ms(ctypes.c_uint(int(seconds * 1000)))

    def set_deferred_cp_async(self, on: bool) -> None:
        """cp.async copies land only at the gie_cp_async_wait_group / wait_all that covers
        their commit group (as on the GPU), instead of at once: checks a pipeline's waits."""
        self._library.gie_shim_set_deferred_cp_async(ctypes.c_int(1 if on else 0))

    def launch(
        self,
        entry: str,
        grid: Sequence[int],
        block: Sequence[int],
        args: Sequence[Any],
        shared_bytes: int = 0,
    ) -> None:
        """Run ``entry`` over ``grid`` blocks of ``block`` threads (1 to 3 numbers each).

        Pointer parameters take C-contiguous NumPy arrays of the matching dtype (or None for
        a null pointer); scalars take Python numbers. ``shared_bytes``: dynamic shared memory
        per block (``extern __shared__``), as on the GPU.
        """
        if shared_bytes < 0:
            raise ShimError(f"{entry}: shared_bytes must be >= 0, got {shared_bytes}")
        if entry not in self.entries:
            raise ShimError(f"{self.name} has no kernel {entry!r}; it has {sorted(self.entries)}")
        parameters = self.entries[entry].parameters
        if len(args) != len(parameters):
            raise ShimError(f"{entry} takes {len(parameters)} arguments, got {len(args)}")
        values: list[Any] = []
        for parameter, value in zip(parameters, args):
            values.append(self._convert(entry, parameter, value))
        pointers = (ctypes.c_void_p * len(values))(
            *[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values]
        )
        dims = [*_dims(grid), *_dims(block)]
        if dims[3] * dims[4] * dims[5] > 1024:
            raise ShimError(f"{entry}: {dims[3:]} is more than 1024 threads per block")
        launch = (ctypes.c_uint * 6)(*dims)
        self._library.gie_shim_set_dynamic_shared_bytes(ctypes.c_uint(int(shared_bytes)))
        getattr(self._library, f"gie_launch_{entry}")(launch, pointers)

    @staticmethod
    def _convert(entry: str, parameter: Parameter, value: Any) -> Any:
        if not parameter.pointer:
            return _SCALARS[parameter.base_type](value)
        if value is None:
            return ctypes.c_void_p(None)
        if not isinstance(value, np.ndarray):
            raise ShimError(f"{entry}: {parameter.name} needs a NumPy array or None")
        wanted = _POINTEES[parameter.base_type]
        if value.dtype != wanted or not value.flags.c_contiguous:
            raise ShimError(
                f"{entry}: {parameter.name} needs a C-contiguous {wanted} array, "
                f"got {value.dtype} (contiguous={value.flags.c_contiguous})"
            )
        return ctypes.c_void_p(value.ctypes.data)


def _dims(numbers: Sequence[int] | int) -> list[int]:
    values = [int(numbers)] if isinstance(numbers, int) else [int(n) for n in numbers]
    return [*values, 1, 1, 1][:3]


def build(source: str, name: str, cache_dir: str | os.PathLike[str] | None = None) -> ShimLibrary:
    """Compile ``source`` (called ``name`` in errors) with the shim into a cached library."""
    reason = compiler_available()
    if reason is not None:
        raise ShimError(reason)
    entries = entry_points(source)
    if not entries:
        raise ShimError(f'{name} has no extern "C" __global__ kernel')
    full = rewrite_dynamic_shared(source) + launcher_source(entries)
    digest = hashlib.sha256()
    headers = [SHIM_HEADER, *sorted(KERNEL_DIR.glob("*.cuh"))]
    for part in (full, *(h.read_text() for h in headers), " ".join(FLAGS), _compiler_version()):
        digest.update(part.encode())
        digest.update(b"\x01")
    key = digest.hexdigest()
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    library = directory / f"{key}.so"
    if not library.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        # Private names until the final rename: parallel test workers may build the same key.
        cpp = directory / f"{key}.{os.getpid()}.cpp"
        temporary = directory / f"{key}.so.tmp{os.getpid()}"
        cpp.write_text(full)
        command = [COMPILER, *FLAGS, "-include", str(SHIM_HEADER), f"-I{KERNEL_DIR}"]
        command += ["-x", "c++", str(cpp), "-o", str(temporary)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise ShimError(f"g++ failed to compile {name} with the CPU shim:\n{result.stderr}")
            os.replace(temporary, library)
        finally:
            cpp.unlink(missing_ok=True)
            temporary.unlink(missing_ok=True)
    return ShimLibrary(library, entries, name)


def build_file(
    path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> ShimLibrary:
    """:func:`build` for a kernel file."""
    path = Path(path)
    return build(path.read_text(), path.name, cache_dir)

"""Compile CUDA C++ to PTX/CUBIN with NVRTC, with no GPU, and cache the result on disk.

NVRTC comes from pip wheels (``cuda-toolkit[nvrtc,cudart]``: the library and the runtime
headers such as ``cuda_fp16.h``); the Python binding is ``cuda.bindings.nvrtc`` (package
``cuda-bindings``), falling back to ``cupy.cuda.nvrtc``. Both are imported lazily, on the first
compile, so importing this module never needs them.

Every compile asks ptxas for its resource report (``-Xptxas=-v``); :func:`parse_ptxas_log`
turns it into :class:`KernelResources` (registers, spill stores/loads, shared memory, stack)
per ``extern "C"`` entry point. Results are cached in a :class:`CompileCache` keyed by
``sha256(source, options, arch, NVRTC version)``; a hit reads the stored binary and log and
never calls NVRTC.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: The architectures every kernel is checked for (A100 and H100).
DEFAULT_ARCHS = ("sm_80", "sm_90")

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"


class NvrtcUnavailableError(RuntimeError):
    """Neither cuda.bindings.nvrtc nor cupy.cuda.nvrtc (with its library) can be loaded."""


class CompileError(RuntimeError):
    """NVRTC refused a source; the message names the file and carries the compiler log."""

    def __init__(self, name: str, arch: str, log: str) -> None:
        super().__init__(f"NVRTC failed to compile {name} for {arch}:\n{log.strip()}")
        self.name = name
        self.arch = arch
        self.log = log


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reported for one entry point (bytes for memory, counts for registers)."""

    registers: int
    spill_stores: int = 0
    spill_loads: int = 0
    shared_bytes: int = 0
    stack_bytes: int = 0

    @property
    def spills(self) -> bool:
        """True when the kernel uses local memory for spilled registers."""
        return self.spill_stores > 0 or self.spill_loads > 0


@dataclass(frozen=True)
class CompileResult:
    """One compiled program: the binary, the log, per-kernel resources, and whether it hit."""

    name: str
    arch: str
    output: str  # "cubin" or "ptx"
    binary: bytes
    log: str
    resources: dict[str, KernelResources] = field(default_factory=dict)
    cache_hit: bool = False


# --------------------------------------------------------------------------- the binding


class _Binding:
    """A thin uniform face over cuda.bindings.nvrtc or cupy.cuda.nvrtc."""

    def __init__(self) -> None:
        self.kind = ""
        self.module: Any = None
        try:
            from cuda.bindings import nvrtc  # type: ignore[import-not-found]

            nvrtc.nvrtcVersion()
            self.kind, self.module = "cuda.bindings", nvrtc
            return
        except Exception:  # noqa: BLE001 - try the next binding
            pass
        try:
            from cupy.cuda import nvrtc  # type: ignore[import-not-found]

            nvrtc.getVersion()
            self.kind, self.module = "cupy", nvrtc
        except Exception as error:  # both bindings failed: one error
            raise NvrtcUnavailableError(
                "NVRTC is not available: install the dev extra "
                "(cuda-toolkit[nvrtc,cudart]==12.* and cuda-bindings==12.*)"
            ) from error

    def version(self) -> tuple[int, int]:
        if self.kind == "cuda.bindings":
            _, major, minor = self.module.nvrtcVersion()
            return int(major), int(minor)
        major, minor = self.module.getVersion()
        return int(major), int(minor)

    def compile(
        self, source: str, name: str, options: Sequence[str], output: str
    ) -> tuple[bool, bytes, str]:
        """(ok, binary, log) for one compile."""
        if self.kind == "cuda.bindings":
            return self._compile_bindings(source, name, options, output)
        return self._compile_cupy(source, name, options, output)

    def _compile_bindings(
        self, source: str, name: str, options: Sequence[str], output: str
    ) -> tuple[bool, bytes, str]:
        nvrtc = self.module
        _, program = nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], [])
        try:
            encoded = [o.encode() for o in options]
            (status,) = nvrtc.nvrtcCompileProgram(program, len(encoded), encoded)
            _, size = nvrtc.nvrtcGetProgramLogSize(program)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(program, log)
            text = log.rstrip(b"\x00").decode(errors="replace")
            if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
                return False, b"", text
            if output == "cubin":
                _, size = nvrtc.nvrtcGetCUBINSize(program)
                binary = b" " * size
                nvrtc.nvrtcGetCUBIN(program, binary)
            else:
                _, size = nvrtc.nvrtcGetPTXSize(program)
                binary = b" " * size
                nvrtc.nvrtcGetPTX(program, binary)
            return True, bytes(binary), text
        finally:
            nvrtc.nvrtcDestroyProgram(program)

    def _compile_cupy(
        self, source: str, name: str, options: Sequence[str], output: str
    ) -> tuple[bool, bytes, str]:
        nvrtc = self.module
        program = nvrtc.createProgram(source, name, [], [])
        try:
            try:
                nvrtc.compileProgram(program, list(options))
                ok = True
            except nvrtc.NVRTCError:
                ok = False
            log = nvrtc.getProgramLog(program)
            if not ok:
                return False, b"", log
            binary = nvrtc.getCUBIN(program) if output == "cubin" else nvrtc.getPTX(program)
            binary = binary.encode() if isinstance(binary, str) else bytes(binary)
            return True, binary, log
        finally:
            nvrtc.destroyProgram(program)


_BINDING: _Binding | None = None


def _binding() -> _Binding:
    global _BINDING
    if _BINDING is None:
        _BINDING = _Binding()
    return _BINDING


def nvrtc_available() -> str | None:
    """None when NVRTC can compile here, else the reason it cannot."""
    try:
        _binding()
    except NvrtcUnavailableError as error:
        return f"{error} ({error.__cause__})"
    return None


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library in use."""
    return _binding().version()


def cuda_include_dirs() -> list[Path]:
    """Folders holding the CUDA runtime headers (cuda_fp16.h ...) from the pip wheels."""
    found: list[Path] = []
    for root in map(Path, sys.path):
        for relative in ("nvidia/cuda_runtime/include", "nvidia/cu13/include"):
            candidate = root / relative
            if (candidate / "cuda_fp16.h").is_file() and candidate not in found:
                found.append(candidate)
    return found


# --------------------------------------------------------------------------- ptxas log

_ENTRY = re.compile(r"(?:Compiling entry function|Function properties for) '?([A-Za-z_]\w*)'?")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")
_SHARED = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, KernelResources]:
    """Per entry point resources from a ``-Xptxas=-v`` log (device functions are skipped)."""
    fields: dict[str, dict[str, int]] = {}
    current: str | None = None
    for line in log.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = entry.group(1)
            if "Compiling entry function" in line:
                fields.setdefault(current, {})
            continue
        if current is None or current not in fields:
            continue
        spills = _SPILLS.search(line)
        if spills:
            stack, stores, loads = (int(g) for g in spills.groups())
            fields[current].update(stack_bytes=stack, spill_stores=stores, spill_loads=loads)
        registers = _REGISTERS.search(line)
        if registers:
            fields[current]["registers"] = int(registers.group(1))
            shared = _SHARED.search(line)
            fields[current]["shared_bytes"] = int(shared.group(1)) if shared else 0
    return {
        name: KernelResources(**values) for name, values in fields.items() if "registers" in values
    }


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``~/.cache/gie-studio/nvrtc``: the user's cache folder (pass another to CompileCache)."""
    return Path.home() / ".cache" / "gie-studio" / "nvrtc"


class CompileCache:
    """A folder of ``<sha256>.bin`` + ``<sha256>.json`` (log, name, arch) compile results."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(source: str, options: Sequence[str], arch: str, version: tuple[int, int]) -> str:
        digest = hashlib.sha256()
        for part in (source, "\0".join(options), arch, f"{version[0]}.{version[1]}"):
            digest.update(part.encode())
            digest.update(b"\x01")
        return digest.hexdigest()

    def load(self, key: str) -> tuple[bytes, str] | None:
        binary = self.directory / f"{key}.bin"
        meta = self.directory / f"{key}.json"
        try:
            log = json.loads(meta.read_text())["log"]
            return binary.read_bytes(), log
        except (OSError, ValueError, KeyError):
            return None

    def store(self, key: str, binary: bytes, log: str, name: str, arch: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # Write the binary first and the metadata last (atomically): a reader that finds the
        # metadata always finds a complete binary.
        _atomic_write(self.directory / f"{key}.bin", binary)
        meta = json.dumps({"name": name, "arch": arch, "log": log})
        _atomic_write(self.directory / f"{key}.json", meta.encode())


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    temporary.write_bytes(data)
    os.replace(temporary, path)


# --------------------------------------------------------------------------- compile


def compile_options(arch: str, extra: Sequence[str] = ()) -> list[str]:
    """The options every kernel is compiled with (resource report on, kernel dir included)."""
    options = ["-std=c++17", f"--gpu-architecture={arch}", "-Xptxas=-v", f"-I{KERNEL_DIR}"]
    options += [f"-I{path}" for path in cuda_include_dirs()]
    return [*options, *extra]


def compile_source(
    source: str,
    name: str,
    arch: str = "sm_80",
    output: str = "cubin",
    extra_options: Sequence[str] = (),
    cache: CompileCache | None = None,
) -> CompileResult:
    """Compile ``source`` (called ``name`` in messages) for ``arch`` to ``output``.

    Raises :class:`CompileError` (naming ``name`` and carrying the log) when NVRTC refuses it
    and :class:`NvrtcUnavailableError` when there is no NVRTC.
    """
    if output not in ("cubin", "ptx"):
        raise ValueError(f"output must be 'cubin' or 'ptx', not {output!r}")
    binding = _binding()
    options = compile_options(arch, extra_options)
    # Include paths differ between machines; the key hashes what the compiler sees instead:
    # the source (with the headers it includes from the kernel folder) and the other options.
    portable = [o for o in options if not o.startswith("-I")] + [output]
    key_source = source + "".join(_header_texts())
    key = CompileCache.key(key_source, portable, arch, binding.version())
    if cache is not None:
        stored = cache.load(key)
        if stored is not None:
            cache.hits += 1
            binary, log = stored
            return CompileResult(name, arch, output, binary, log, parse_ptxas_log(log), True)
        cache.misses += 1
    ok, binary, log = binding.compile(source, name, options, output)
    if not ok:
        raise CompileError(name, arch, log)
    if cache is not None:
        cache.store(key, binary, log, name, arch)
    return CompileResult(name, arch, output, binary, log, parse_ptxas_log(log), False)


def compile_file(
    path: str | os.PathLike[str],
    arch: str = "sm_80",
    output: str = "cubin",
    extra_options: Sequence[str] = (),
    cache: CompileCache | None = None,
) -> CompileResult:
    """Compile a kernel file (its name appears in every error)."""
    path = Path(path)
    return compile_source(path.read_text(), path.name, arch, output, extra_options, cache)


def _header_texts() -> list[str]:
    return [p.read_text() for p in sorted(KERNEL_DIR.glob("*.cuh"))]


def kernel_files() -> list[Path]:
    """Every hand-written kernel source (``kernels/*.cu``), sorted."""
    return sorted(KERNEL_DIR.glob("*.cu"))


def resources_as_dict(result: CompileResult) -> dict[str, dict[str, int]]:
    """JSON-ready per-kernel resources of a result."""
    return {name: asdict(r) for name, r in sorted(result.resources.items())}

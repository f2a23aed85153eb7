"""Just-in-time build of the ``csrc/`` kernels with ``torch.utils.cpp_extension.load``.

A build is cached in its own directory per torch version, Python version, CUDA toolkit and GPU
architecture list (``$TORCH_EXTENSIONS_DIR/lt_distill_msda/<tag>``, default under
``~/.cache/torch_extensions``); ninja makes a repeated build a no-op. The CPU kernels need only a
C++ compiler; the CUDA kernels also need the CUDA toolkit whose major version matches torch's.

Loading a build registers the ``lt_distill::ms_deform_attn`` operator; a process can hold only one
build (the operator namespace is registered once).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import torch

from ..errors import LtDistillError

CSRC = Path(__file__).parent / "csrc"
CPU_SOURCES = ("ms_deform_attn_cpu.cpp",)
CUDA_SOURCES = ("ms_deform_attn_cuda.cu",)
HEADERS = ("ms_deform_attn.h", "ms_deform_attn_core.h")


class OpsBuildError(LtDistillError):
    """The kernels could not be built or loaded; the message says why and how to fix it."""


@dataclasses.dataclass(frozen=True)
class BuildInfo:
    """What a build contains and where it lives."""

    library: Path
    with_cuda: bool
    arch_list: tuple[str, ...]  # e.g. ("8.0", "9.0+PTX"); empty for a CPU-only build
    torch_version: str
    cuda_version: str | None  # the toolkit (nvcc) version for CUDA builds

    def describe(self) -> str:
        if not self.with_cuda:
            return f"CPU kernels (torch {self.torch_version})"
        archs = ", ".join(f"sm_{a.replace('.', '').replace('+PTX', '')}{'+PTX' if a.endswith('+PTX') else ''}"
                          for a in self.arch_list)
        return f"CPU + CUDA kernels for {archs} (torch {self.torch_version}, nvcc {self.cuda_version})"


_LOADED: BuildInfo | None = None


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported quietly: on a machine without a GPU its import logs
    "No CUDA runtime is found", which is noise for the CPU build."""
    log = logging.getLogger("torch.utils.cpp_extension")
    previous = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        log.setLevel(previous)
    return cpp_extension


def loaded_build() -> BuildInfo | None:
    """The build loaded into this process, if any."""
    return _LOADED


def find_cuda_home() -> Path | None:
    """The CUDA toolkit prefix: ``$CUDA_HOME``/``$CUDA_PATH``, else the prefix of ``nvcc`` on PATH,
    else ``/usr/local/cuda``; only a directory holding ``bin/nvcc`` and ``include/cuda_runtime.h``
    counts (``nvcc`` on PATH is often a wrapper script outside the toolkit)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for candidate in candidates:
        if candidate and _is_toolkit(Path(candidate)):
            return Path(candidate)
    return None


def _is_toolkit(path: Path) -> bool:
    return (path / "bin" / "nvcc").is_file() and (path / "include" / "cuda_runtime.h").is_file()


def nvcc_version(cuda_home: Path) -> str:
    """``major.minor`` of the toolkit's nvcc."""
    out = subprocess.run([str(cuda_home / "bin" / "nvcc"), "--version"], capture_output=True, text=True, check=True)
    match = re.search(r"release (\d+)\.(\d+)", out.stdout)
    if match is None:
        raise OpsBuildError(f"cannot parse the version of {cuda_home / 'bin' / 'nvcc'}: {out.stdout.strip()!r}")
    return f"{match.group(1)}.{match.group(2)}"


def cuda_toolkit_problem() -> str | None:
    """Why CUDA kernels cannot be built here (with the fix), or None when they can."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build of torch"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        hint = f" (nvcc on PATH is {shutil.which('nvcc')}, which is not inside a toolkit)" if shutil.which("nvcc") else ""
        return (
            f"CUDA_HOME is unset and no CUDA toolkit was found{hint}; "
            f"install CUDA {torch.version.cuda.split('.')[0]}.x and export CUDA_HOME=/usr/local/cuda-<version>"
        )
    version = nvcc_version(cuda_home)
    if version.split(".")[0] != torch.version.cuda.split(".")[0]:
        return (
            f"nvcc {version} at {cuda_home} does not match the CUDA {torch.version.cuda} torch was built with "
            f"(the major versions must agree); point CUDA_HOME at a CUDA {torch.version.cuda.split('.')[0]}.x "
            f"toolkit or install the matching torch build"
        )
    return None


def resolve_arch_list(arch_list: str | None = None) -> tuple[str, ...]:
    """GPU architectures to compile for: ``arch_list`` (``"8.0;9.0+PTX"``, spaces also separate),
    else ``$TORCH_CUDA_ARCH_LIST``, else those of the visible GPUs with PTX for the newest."""
    spec = arch_list if arch_list is not None else os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    archs = [a for a in re.split(r"[;\s]+", spec.strip()) if a]
    if not archs:
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        if not caps:
            raise OpsBuildError(
                "no GPU is visible to choose the CUDA architectures from; set TORCH_CUDA_ARCH_LIST "
                '(e.g. TORCH_CUDA_ARCH_LIST="8.0;9.0") or pass --arch'
            )
        archs = [f"{major}.{minor}" for major, minor in caps]
        archs[-1] += "+PTX"
    for arch in archs:
        if not re.fullmatch(r"\d+\.\d+a?(\+PTX)?", arch):
            raise OpsBuildError(f"invalid CUDA architecture {arch!r}; use forms like 8.0, 9.0a or 9.0+PTX")
    return tuple(archs)


def gencode_flags(archs: tuple[str, ...]) -> list[str]:
    flags = []
    for arch in archs:
        num = arch.split("+")[0].replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def arch_covers_device(archs: tuple[str, ...], capability: tuple[int, int]) -> bool:
    """Whether a build for ``archs`` has a kernel image for a GPU of ``capability``: a cubin of the
    same major version and no newer minor, or PTX that is not newer than the device."""
    for arch in archs:
        major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", arch).groups())
        exact_family = arch.split("+")[0].endswith("a")  # sm_90a etc. run only on that exact chip
        if exact_family and (major, minor) != capability:
            continue
        if major == capability[0] and minor <= capability[1]:
            return True
        if arch.endswith("+PTX") and (major, minor) <= capability:
            return True
    return False


_FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)


def embedded_kernel_images(library: Path) -> list[str]:
    """The GPU code images embedded in a shared library, read from its fat binaries: ``sm_80`` for
    a cubin, ``compute_90`` for PTX (what actually got built, whatever was asked for)."""
    data = library.read_bytes()
    images = []
    start = data.find(_FATBIN_MAGIC)
    while start != -1:
        # Fat binary header: magic u32, version u16, header size u16, payload size u64.
        header_size, payload_size = struct.unpack_from("<HQ", data, start + 6)
        offset, end = start + header_size, start + header_size + payload_size
        while offset < end:
            # Entry header: kind u16 (1 PTX, 2 ELF), u16, header size u32, payload size u64, ...,
            # SM number u32 at byte 28.
            kind, entry_header, entry_size = struct.unpack_from("<HxxIQ", data, offset)
            (sm,) = struct.unpack_from("<I", data, offset + 28)
            images.append(f"{'sm' if kind == 2 else 'compute'}_{sm}")
            offset += entry_header + entry_size
        start = data.find(_FATBIN_MAGIC, end)
    return images


def build_directory(with_cuda: bool, archs: tuple[str, ...], cuda_version: str | None) -> Path:
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or _cpp_extension().get_default_build_root())
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    if with_cuda:
        tag += f"-nvcc{cuda_version}-" + "_".join(a.replace(".", "").replace("+PTX", "ptx") for a in archs)
    else:
        tag += "-cpu"
    return root / "lt_distill_msda" / tag.replace("+", "_")


def _first_error_line(log: str) -> str | None:
    """The first compiler diagnostic in a build log (the log itself is long)."""
    for line in log.splitlines():
        if re.search(r"\berror\b", line, re.IGNORECASE) and "Error building extension" not in line:
            return line.strip()
    return None


def build(with_cuda: bool, arch_list: str | None = None, verbose: bool = False) -> BuildInfo:
    """Compile (or reuse the cached build of) the kernels and load them into this process.

    Args:
        with_cuda: also compile the CUDA kernels (needs the CUDA toolkit).
        arch_list: GPU architectures for the CUDA kernels (see :func:`resolve_arch_list`).
        verbose: show the compiler commands.

    Raises:
        OpsBuildError: no compiler or toolkit, a failed compile, or a different build is already loaded.
    """
    global _LOADED
    cpp_extension = _cpp_extension()
    archs: tuple[str, ...] = ()
    cuda_version = None
    if with_cuda:
        problem = cuda_toolkit_problem()
        if problem is not None:
            raise OpsBuildError(problem)
        cuda_home = find_cuda_home()
        cuda_version = nvcc_version(cuda_home)
        archs = resolve_arch_list(arch_list)
        # cpp_extension resolved CUDA_HOME when it was imported (possibly to a wrapper's prefix).
        cpp_extension.CUDA_HOME = str(cuda_home)
    directory = build_directory(with_cuda, archs, cuda_version)
    if _LOADED is not None:
        if _LOADED.library.parent == directory:
            return _LOADED
        raise OpsBuildError(
            f"another build of the kernels is already loaded in this process ({_LOADED.describe()}); "
            "build in a fresh process"
        )
    if not cpp_extension.is_ninja_available():
        raise OpsBuildError("ninja is not installed; pip install ninja")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise OpsBuildError("no C++ compiler found; install g++ (or set CXX)")
    sources = [str(CSRC / name) for name in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    directory.mkdir(parents=True, exist_ok=True)
    name = "lt_distill_msda_cuda" if with_cuda else "lt_distill_msda_cpu"
    try:
        library = cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=["-O3", "-fopenmp"],
            extra_cuda_cflags=["-O3", *gencode_flags(archs)],
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(CSRC)],
            build_directory=str(directory),
            verbose=verbose,
            with_cuda=with_cuda,
            is_python_module=False,
        )
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        detail = _first_error_line(str(exc)) or type(exc).__name__
        raise OpsBuildError(
            f"building the {'CUDA' if with_cuda else 'CPU'} kernels in {directory} failed ({detail}); "
            "run `lt-distill build-ops --verbose` to see the compiler output"
        ) from exc
    _LOADED = BuildInfo(
        library=Path(library),
        with_cuda=with_cuda,
        arch_list=archs,
        torch_version=torch.__version__,
        cuda_version=cuda_version,
    )
    return _LOADED

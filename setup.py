"""Build script of attn_kernels.

Metadata lives in pyproject.toml. The package is pure Python plus Triton kernels
(compiled at first use) plus, when nvcc is found, the CUDA C++ extension
`attn_kernels._C` (csrc/): nvcc compiles each source to an object in parallel and
links them into a pybind11 module against the static CUDA runtime only (no libtorch),
so it builds and imports with a CPU-only torch too.

Environment:
    ATTN_KERNELS_SKIP_CUDA_BUILD=1   pure-Python install, no extension
    ATTN_KERNELS_CUDA_ARCHS          targets, default "80+PTX;90a" (sm_80 SASS + PTX
                                     for newer GPUs, and sm_90a SASS); entries like 80,
                                     86, 90a, 8.0, each optionally +PTX
    ATTN_KERNELS_PTXAS_VERBOSE=1     print registers / shared memory per kernel
    MAX_JOBS                         parallel nvcc processes (default: CPU count)
    CUDA_HOME / CUDA_PATH            where to look for bin/nvcc before PATH

Without nvcc the install still succeeds; `attn_kernels.available_backends()` then
says why "cuda" is missing. Objects are kept under build/attn_kernels_C/ and only
rebuilt when a source or header changes.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
EXTENSION = "attn_kernels._C"
DEFAULT_ARCHS = "80+PTX;90a"
MIN_ARCH = 80  # cp.async, ldmatrix, bf16 mma.sync

NVCC_FLAGS = ["-O3", "--use_fast_math", "-std=c++17", "-lineinfo", "-DNDEBUG"]
HOST_FLAGS = ["-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"]


def parse_archs(spec: str) -> list:
    """"80+PTX;90a" -> [("80", True), ("90a", False)]: (compute capability, embed PTX)."""
    archs = []
    for entry in re.split(r"[;,\s]+", spec.strip()):
        if not entry:
            continue
        ptx = entry.upper().endswith("+PTX")
        name = entry[: -len("+PTX")] if ptx else entry
        name = re.sub(r"^(sm_|compute_)", "", name.lower()).replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", name):
            raise ValueError(f"ATTN_KERNELS_CUDA_ARCHS: cannot read {entry!r} (expected e.g. 80, 90a, 8.6, 80+PTX)")
        if int(re.sub(r"[af]$", "", name)) < MIN_ARCH:
            raise ValueError(f"ATTN_KERNELS_CUDA_ARCHS: {entry!r} is below sm_{MIN_ARCH}, which the kernels need")
        if (name, ptx) not in archs:
            archs.append((name, ptx))
    if not archs:
        raise ValueError(f"ATTN_KERNELS_CUDA_ARCHS names no architecture: {spec!r}")
    return archs


def gencode_flags(archs: list) -> list:
    flags = []
    for name, ptx in archs:
        codes = f"[sm_{name},compute_{name}]" if ptx else f"sm_{name}"
        flags.append(f"-gencode=arch=compute_{name},code={codes}")
    return flags


def find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.access(default, os.X_OK) else None


def pybind11_include():
    """pybind11's headers: the pybind11 package, else the copy every torch wheel ships."""
    try:
        import pybind11

        return pybind11.get_include()
    except ImportError:
        pass
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.origin:
        include = Path(spec.origin).parent / "include"
        if (include / "pybind11" / "pybind11.h").is_file():
            return str(include)
    return None


def cuda_sources() -> list:
    return sorted(CSRC.rglob("*.cu")) + [CSRC / "bindings.cpp"]


def skip_reason():
    """Why the extension is not built here, or None to build it."""
    if os.environ.get("ATTN_KERNELS_SKIP_CUDA_BUILD", "0") == "1":
        return "ATTN_KERNELS_SKIP_CUDA_BUILD=1"
    if not (CSRC / "bindings.cpp").is_file():
        return "no csrc/ sources"
    if find_nvcc() is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return None


class NvccBuildExt(build_ext):
    """build_ext that compiles csrc/ with nvcc (one process per source, in parallel)
    and links with nvcc against the static CUDA runtime, hiding its symbols."""

    def build_extension(self, ext):
        if ext.name != EXTENSION:
            return super().build_extension(ext)
        started = time.time()
        nvcc = find_nvcc()
        archs_spec = os.environ.get("ATTN_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
        gencode = gencode_flags(parse_archs(archs_spec))
        pybind = pybind11_include()
        if pybind is None:
            raise RuntimeError(
                "building attn_kernels._C needs pybind11's headers: pip install pybind11 "
                "(or set ATTN_KERNELS_SKIP_CUDA_BUILD=1 for a pure-Python install)"
            )
        verbose = os.environ.get("ATTN_KERNELS_PTXAS_VERBOSE", "0") == "1"
        cu_flags = NVCC_FLAGS + HOST_FLAGS + gencode + (["-Xptxas", "-v"] if verbose else [])
        cpp_flags = ["-O2", "-std=c++17", "-DNDEBUG"] + HOST_FLAGS + ["-I", pybind, "-I", sysconfig.get_paths()["include"]]

        key = hashlib.sha1(repr((nvcc, cu_flags, cpp_flags, sys.version)).encode()).hexdigest()[:12]
        obj_dir = ROOT / "build" / "attn_kernels_C" / key
        obj_dir.mkdir(parents=True, exist_ok=True)
        generated = obj_dir / "include"
        generated.mkdir(exist_ok=True)
        self._write_if_changed(
            generated / "attn_kernels_build.h",
            f'// written by setup.py\n#define ATTN_KERNELS_ARCHS "{archs_spec}"\n',
        )
        includes = ["-I", str(CSRC), "-I", str(generated)]

        headers = [p for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh")] + [generated / "attn_kernels_build.h"]
        newest_header = max(p.stat().st_mtime for p in headers)
        jobs = []
        for src in cuda_sources():
            obj = obj_dir / (str(src.relative_to(CSRC)).replace(os.sep, "__") + ".o")
            flags = cu_flags if src.suffix == ".cu" else cpp_flags
            cmd = [nvcc, "-c", str(src), "-o", str(obj)] + includes + flags
            fresh = obj.exists() and obj.stat().st_mtime >= max(src.stat().st_mtime, newest_header)
            jobs.append((src, obj, cmd, fresh))

        workers = int(os.environ.get("MAX_JOBS") or self.parallel or os.cpu_count() or 1)
        stale = [job for job in jobs if not job[3]]
        print(f"attn_kernels._C: nvcc {Path(nvcc).resolve()}, archs {archs_spec}: compiling {len(stale)} of "
              f"{len(jobs)} sources with {workers} jobs", flush=True)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(pool.map(self._compile, stale))
        failed = [r for r in results if r is not None]
        if failed:
            raise RuntimeError("attn_kernels._C: nvcc failed on " + ", ".join(failed))

        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        # static cudart; --exclude-libs keeps its symbols private, so they never bind to
        # (or interpose) the libcudart that torch loads into the same process
        link = [nvcc, "-shared", "-o", str(target)] + [str(job[1]) for job in jobs] + [
            "--cudart=static", "-Xlinker", "--exclude-libs,ALL", "-Xcompiler", "-fPIC",
        ]
        self._run(link, "link")
        print(f"attn_kernels._C: built {target} in {time.time() - started:.0f} s", flush=True)

    @staticmethod
    def _write_if_changed(path: Path, text: str):
        if not path.exists() or path.read_text() != text:
            path.write_text(text)

    def _compile(self, job):
        src, _, cmd, _ = job
        started = time.time()
        try:
            self._run(cmd, src.name)
        except RuntimeError:
            return src.name
        print(f"  compiled {src.relative_to(CSRC)} ({time.time() - started:.0f} s)", flush=True)
        return None

    @staticmethod
    def _run(cmd, what):
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.stdout.strip():
            print(f"--- {what}\n{proc.stdout.rstrip()}", flush=True)
        if proc.returncode != 0:
            print(f"--- {what} failed: {' '.join(cmd)}", file=sys.stderr, flush=True)
            raise RuntimeError(what)


def extensions():
    reason = skip_reason()
    if reason is not None:
        print(f"attn_kernels: not building the CUDA extension attn_kernels._C: {reason}", flush=True)
        return []
    sources = [str(p.relative_to(ROOT)) for p in cuda_sources()]
    return [Extension(EXTENSION, sources=sources)]


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it
    setup(ext_modules=extensions(), cmdclass={"build_ext": NvccBuildExt})

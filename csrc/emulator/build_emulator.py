"""Build the CPU emulator of the CUDA backend: the sources of attn_kernels._C (kernels,
attention.cu, bindings.cpp) compiled by the host C++ compiler against
cuda_emulator.h / .cpp, as the module `attn_kernels_emulator._C`. It takes host (CPU)
pointers, so the real kernel code (fragment layouts, masks, pipeline indices) runs on
CPU tensors through the same Python calls as on the GPU; see cuda_emulator.h.

Needs g++ (or $CXX), the CUDA headers (cuda_fp16.h, ...: from CUDA_HOME, nvcc's
toolkit or /usr/local/cuda) and pybind11's headers. The module is cached under the
output dir by a hash of the sources and flags.

    python csrc/emulator/build_emulator.py [OUT_DIR]   # prints the dir to put on sys.path
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent
EMULATOR = CSRC / "emulator"
DEFAULT_OUT = CSRC.parent / "build" / "attn_kernels_emulator"


def cuda_include():
    """A directory holding cuda_runtime.h and cuda_fp16.h, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += ["/usr/local/cuda"]
    for root in filter(None, candidates):
        include = Path(root) / "include"
        if (include / "cuda_fp16.h").is_file() and (include / "cuda_runtime.h").is_file():
            return str(include)
    return None


def pybind11_include():
    try:
        import pybind11

        return pybind11.get_include()
    except ImportError:
        import importlib.util

        spec = importlib.util.find_spec("torch")
        if spec is not None and spec.origin:
            include = Path(spec.origin).parent / "include"
            if (include / "pybind11" / "pybind11.h").is_file():
                return str(include)
    return None


def missing() -> str | None:
    """Why the emulator cannot be built here, or None."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no host C++ compiler (g++ or $CXX)"
    if cuda_include() is None:
        return "no CUDA headers (cuda_fp16.h) found: set CUDA_HOME"
    if pybind11_include() is None:
        return "no pybind11 headers"
    return None


def sources() -> list:
    return (sorted((CSRC / "instantiations").glob("*.cu")) + [CSRC / "attention.cu", CSRC / "bindings.cpp",
                                                              EMULATOR / "cuda_emulator.cpp"])


def build(out_dir: Path = DEFAULT_OUT, jobs: int | None = None) -> Path:
    """Compile (if needed) and return the directory to put on sys.path."""
    reason = missing()
    if reason is not None:
        raise RuntimeError(f"cannot build the CUDA emulator: {reason}")
    cxx = os.environ.get("CXX", "g++")
    flags = [
        "-std=c++17", "-O2", "-fPIC", "-w", "-fvisibility=hidden", "-DNDEBUG",
        "-DATTN_KERNELS_ARCHS=\"emulator\"",
        "-I", str(CSRC), "-I", cuda_include(), "-I", pybind11_include(), "-I", sysconfig.get_paths()["include"],
        "-include", str(EMULATOR / "cuda_emulator.h"),
    ]
    digest = hashlib.sha1(repr((cxx, flags, sys.version)).encode())
    for path in sorted(CSRC.rglob("*")):
        if path.is_file() and path.suffix in (".cu", ".cuh", ".h", ".cpp"):
            digest.update(path.read_bytes())
    root = Path(out_dir) / digest.hexdigest()[:12]
    package = root / "attn_kernels_emulator"
    target = package / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    if target.exists():
        return root
    objects = root / "obj"
    objects.mkdir(parents=True, exist_ok=True)
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text('"""CPU emulator of attn_kernels._C (csrc/emulator)."""\n')

    def compile_one(src: Path) -> Path:
        obj = objects / (src.stem + src.suffix.replace(".", "_") + ".o")
        cmd = [cxx, "-x", "c++", "-c", str(src), "-o", str(obj)] + flags
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"emulator build failed on {src.name}:\n{proc.stdout}")
        return obj

    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        objs = list(pool.map(compile_one, sources()))
    tmp = target.with_suffix(".tmp")
    link = [cxx, "-shared", "-o", str(tmp)] + [str(o) for o in objs]
    proc = subprocess.run(link, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"emulator link failed:\n{proc.stdout}")
    tmp.rename(target)  # atomic: a concurrent build sees either nothing or the module
    return root


def load(out_dir: Path = DEFAULT_OUT):
    """Build if needed and import attn_kernels_emulator._C."""
    root = str(build(out_dir))
    if root not in sys.path:
        sys.path.insert(0, root)
    import importlib

    return importlib.import_module("attn_kernels_emulator._C")


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))

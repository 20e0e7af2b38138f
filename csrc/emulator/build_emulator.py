"""Build the CPU emulator of the CUDA backend: the sources of attn_kernels._C (kernels,
attention.cu, bindings.cpp) compiled by the host C++ compiler against
cuda_emulator.h / .cpp, as the module `attn_kernels_emulator._C`. It takes host (CPU)
pointers, so the real kernel code (fragment layouts, masks, pipeline indices) runs on
CPU tensors through the same Python calls as on the GPU; see cuda_emulator.h.

Needs g++ (or $CXX), the CUDA headers (cuda_fp16.h, ...: from CUDA_HOME, nvcc's
toolkit or /usr/local/cuda) and pybind11's headers.

Caching: each object is kept under OUT_DIR/obj/ by a hash of the flags and of the text
of its source and every csrc header it includes, so a change to one header rebuilds
only the sources that include it, and a mutated copy of csrc/ (build(csrc=...), used by
the tests to show that the checks catch a removed barrier or bounds check) reuses every
object its mutation does not touch. Modules are kept under OUT_DIR/<hash of their
objects>/.

    python csrc/emulator/build_emulator.py [OUT_DIR]   # prints the dir to put on sys.path
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent
DEFAULT_OUT = CSRC.parent / "build" / "attn_kernels_emulator"
_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


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


def sources(csrc: Path = CSRC) -> list:
    return (sorted((csrc / "instantiations").glob("*.cu"))
            + [csrc / "attention.cu", csrc / "bindings.cpp", csrc / "emulator" / "cuda_emulator.cpp"])


def _local_includes(path: Path, csrc: Path, seen: dict) -> None:
    """Add path and the csrc files it includes ("..." includes, recursively) to seen."""
    if path in seen:
        return
    seen[path] = path.read_bytes()
    for name in _INCLUDE.findall(seen[path].decode("utf-8", "replace")):
        for base in (path.parent, csrc):
            candidate = (base / name).resolve()
            if candidate.is_file():
                _local_includes(candidate, csrc, seen)
                break


def _object_key(src: Path, csrc: Path, cxx: str, flags: list) -> str:
    files: dict = {}
    for path in (src, csrc / "emulator" / "cuda_emulator.h"):
        _local_includes(path.resolve(), csrc.resolve(), files)
    digest = hashlib.sha1(repr((cxx, flags, sys.version, src.name)).encode())
    for path in sorted(files, key=lambda p: str(p.relative_to(csrc.resolve()))):
        digest.update(str(path.relative_to(csrc.resolve())).encode() + b"\0" + files[path])
    return digest.hexdigest()[:16]


def _run(cmd: list, what: str) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"emulator {what} failed:\n{proc.stdout}")


def build(out_dir: Path = DEFAULT_OUT, jobs: int | None = None, csrc: Path = CSRC) -> Path:
    """Compile (what is not cached) the emulator of the sources under csrc and return the
    directory to put on sys.path."""
    reason = missing()
    if reason is not None:
        raise RuntimeError(f"cannot build the CUDA emulator: {reason}")
    csrc, out_dir = Path(csrc), Path(out_dir)
    cxx = os.environ.get("CXX", "g++")
    # -ffp-contract=off: no product is fused into an FMA the GPU code does not fuse
    # (the kernels use __fmul_rn where it matters)
    flags = ["-std=c++17", "-O2", "-fPIC", "-w", "-fvisibility=hidden", "-DNDEBUG", "-ffp-contract=off",
             '-DATTN_KERNELS_ARCHS="emulator"']
    includes = ["-I", cuda_include(), "-I", pybind11_include(), "-I", sysconfig.get_paths()["include"]]
    objects = out_dir / "obj"
    objects.mkdir(parents=True, exist_ok=True)

    def compile_one(src: Path) -> Path:
        obj = objects / f"{src.stem}{src.suffix.replace('.', '_')}-{_object_key(src, csrc, cxx, flags + includes)}.o"
        if not obj.exists():
            tmp = obj.with_suffix(f".{os.getpid()}.tmp")
            _run([cxx, "-x", "c++", "-c", str(src), "-o", str(tmp), "-I", str(csrc), "-include",
                  str(csrc / "emulator" / "cuda_emulator.h")] + flags + includes, f"build of {src.name}")
            os.replace(tmp, obj)  # atomic: a concurrent build sees the old state or the object
        return obj

    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        objs = list(pool.map(compile_one, sources(csrc)))
    root = out_dir / hashlib.sha1("\n".join(o.name for o in objs).encode()).hexdigest()[:12]
    package = root / "attn_kernels_emulator"
    target = package / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    if target.exists():
        return root
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""CPU emulator of attn_kernels._C (csrc/emulator)."""\n')
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    _run([cxx, "-shared", "-o", str(tmp)] + [str(o) for o in objs], "link")
    os.replace(tmp, target)
    return root


def load(out_dir: Path = DEFAULT_OUT):
    """Build if needed and import attn_kernels_emulator._C."""
    root = str(build(out_dir))
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("attn_kernels_emulator._C")


def load_variant(csrc: Path, out_dir: Path = DEFAULT_OUT):
    """Build the emulator of another copy of csrc/ (e.g. a mutated one) and import it
    under a name of its own, next to the default one."""
    root = build(out_dir, csrc=csrc)
    path = root / "attn_kernels_emulator" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    spec = importlib.util.spec_from_file_location(f"attn_kernels_emulator_{root.name}._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))

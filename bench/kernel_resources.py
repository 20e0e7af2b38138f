"""Registers, spills and shared memory of the Triton kernels, compiled for a GPU
that is not here.

    python bench/kernel_resources.py [--arch 90] [--dims 64 128 256] [--json out.json]
    python bench/kernel_resources.py --variants all --dims 64 128 --dtypes bfloat16   # every kernel variant

The Triton launchers in attn_kernels/triton are run on CPU tensors against a
stand-in driver that reports a CUDA target (sm_90 by default): each launch compiles
its kernel exactly as the JIT would on that GPU (same specialisation of pointers and
integers, same constexprs, num_warps and num_stages from launch_config.py) and is
never run. ptxas then reports registers and spill bytes; Triton reports the shared
memory. What this shows without a GPU: configurations that cannot launch (shared
memory over the SM's limit) and those that spill registers to local memory. It says
nothing of speed. The numbers are for the Triton installed here, which may lower a
kernel differently from the Triton on the GPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional

# shared memory a block may use, per compute capability (CUDA programming guide, opt-in maximum)
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}


@dataclass
class KernelResources:
    case: str  # what was launched: "fwd bf16 D=128 causal"
    kernel: str
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int  # stores + loads to local memory, as ptxas counts them
    shared_bytes: int
    fits: bool  # shared memory within the SM's limit

    def row(self) -> str:
        flag = "" if self.fits else "  OVER SMEM LIMIT"
        spill = f"{self.spill_bytes:>6}" if self.spill_bytes else "     -"
        return (f"{self.case:<38} {self.kernel:<24} {self.num_warps:>2}w {self.num_stages}s "
                f"{self.registers:>4} regs {spill} spill {self.shared_bytes / 1024:>7.1f} KiB{flag}")


class _StandInDriver:
    """What triton.runtime.jit asks of the active driver before it compiles."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def compiling_only(arch: int) -> Iterator[list]:
    """Within the block, a Triton launch compiles for sm_<arch> and returns without
    running; yields the list that collects each launch's (kernel name, compiled kernel)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter compiles nothing")
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    compiled: list = []
    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__.lstrip("_"), kernel))
        return kernel

    saved = driver._active  # None until a driver was needed; creating one fails without a GPU
    driver.set_active(_StandInDriver(arch))
    JITFunction.run = run
    try:
        yield compiled
    finally:
        JITFunction.run = original_run
        driver._active = saved


def ptxas_usage(ptx: str, arch: int) -> tuple:
    """(registers, spill bytes) of the one kernel in `ptx`, from `ptxas -v`."""
    from triton.backends.nvidia.compiler import get_ptxas

    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


def measure(case: str, launch: Callable[[], None], arch: int) -> list:
    """Compile what `launch` launches; one KernelResources per kernel."""
    with compiling_only(arch) as compiled:
        launch()
    rows = []
    for name, kernel in compiled:
        regs, spills = ptxas_usage(kernel.asm["ptx"], arch)
        shared = kernel.metadata.shared
        rows.append(KernelResources(case, name, kernel.metadata.num_warps, kernel.metadata.num_stages,
                                    regs, spills, shared, shared <= SMEM_LIMIT.get(arch, SMEM_LIMIT[80])))
    return rows


def _attention_launches(dtype_name: str, dim: int, causal: bool, seqlen: int, backward: bool):
    """A call of the training kernels (forward, or the three backward kernels) on CPU tensors."""
    import torch

    from attn_kernels.triton import launch

    dtype = getattr(torch, dtype_name)
    q, k, v, do = (torch.empty(1, 1, seqlen, dim, dtype=dtype) for _ in range(4))
    scale = dim ** -0.5
    mods = launch.score_mods(q, scale, band=(None, 0 if causal else None))

    def run():
        if not backward:
            launch.forward(q, k, v, mods)
            return
        out = torch.empty_like(q)
        lse = torch.empty(1, 1, seqlen, dtype=torch.float32)
        launch.backward(do, q, k, v, out, lse, None, mods)

    return run


KERNEL_OF_KIND = {"fwd": "attn_fwd_kernel", "dkdv": "bwd_dkdv_kernel", "dq": "bwd_dq_kernel"}


@contextlib.contextmanager
def _variant(name: Optional[str]) -> Iterator[None]:
    """Launches inside compile kernel variant `name` (attn_kernels/triton/variants.py);
    None: whatever the environment selects."""
    if name is None:
        yield
        return
    from attn_kernels.triton import variants

    saved = os.environ.get(variants.ENV)
    os.environ[variants.ENV] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(variants.ENV, None)
        else:
            os.environ[variants.ENV] = saved


def survey(arch: int, dims, dtypes, causals=(False, True), passes=("fwd", "bwd"), seqlen: int = 4096,
           on_row: Optional[Callable] = None, variant_names=(None,), on_refused: Optional[Callable] = None) -> list:
    """Every kernel of the forward and backward at the tiles a launch would use here,
    for each kernel variant of `variant_names` (None: the one selected by default).
    A launch that refuses the target (NotImplementedError, e.g. variant "ws" below
    sm_100) yields no row: on_refused(case, error) is told."""
    rows = []
    for name in variant_names:
        for dtype_name in dtypes:
            for dim in dims:
                for causal in causals:
                    for pass_ in passes:
                        case = f"{pass_} {dtype_name} D={dim}{' causal' if causal else ''}"
                        if name is not None:
                            case = f"[{name}] {case}"
                        launch = _attention_launches(dtype_name, dim, causal, seqlen, pass_ == "bwd")
                        try:
                            with _variant(name):
                                found = measure(case, launch, arch)
                        except NotImplementedError as exc:
                            if on_refused:
                                on_refused(case, exc)
                            continue
                        for row in found:
                            rows.append(row)
                            if on_row:
                                on_row(row)
    return rows


def survey_space(arch: int, dims, dtypes, causals=(False,), seqlen: int = 4096,
                 on_row: Optional[Callable] = None) -> list:
    """Every candidate of tuning.candidates for the fwd, dkdv and dq kernels."""
    import torch

    from attn_kernels.triton import tuning

    rows = []
    for dtype_name in dtypes:
        for dim in dims:
            for causal in causals:
                for kind, kernel in KERNEL_OF_KIND.items():
                    key = tuning.Key.of(kind, getattr(torch, dtype_name), dim, causal)
                    launch = _attention_launches(dtype_name, dim, causal, seqlen, kind != "fwd")
                    for blocks in tuning.candidates(key):
                        case = f"{key.name()} {blocks.BLOCK_M}x{blocks.BLOCK_N}"
                        with tuning.forced(**{kind: blocks}):
                            found = [r for r in measure(case, launch, arch) if r.kernel == kernel]
                        rows.extend(found)
                        for row in found if on_row else ():
                            on_row(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (80, 90)")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--passes", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--space", action="store_true",
                        help="every candidate of the tuning search (attn_kernels/triton/tuning.py), not only the tiles used")
    parser.add_argument("--variants", nargs="+",
                        help="kernel variants to compile (names, or 'all'; default: the one selected by default)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    import triton

    print(f"Triton {triton.__version__}, compiled for sm_{args.arch} (nothing runs; see the module docstring)")
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    show = lambda r: print(r.row(), flush=True)  # noqa: E731
    if args.space:
        rows = survey_space(args.arch, args.dims, args.dtypes, causals, args.seqlen, on_row=show)
    else:
        names = (None,)
        if args.variants:
            from attn_kernels.triton import variants

            names = variants.names() if args.variants == ["all"] else args.variants
            unknown = [n for n in names if n not in variants.VARIANTS]
            if unknown:
                parser.error(f"unknown variant {', '.join(unknown)}; known: {', '.join(variants.names())}")
        refused = lambda case, exc: print(f"{case:<38} refused: {exc}", flush=True)  # noqa: E731
        rows = survey(args.arch, args.dims, args.dtypes, causals, args.passes, args.seqlen, on_row=show,
                      variant_names=names, on_refused=refused)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": args.arch, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0 if all(r.fits for r in rows) else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())

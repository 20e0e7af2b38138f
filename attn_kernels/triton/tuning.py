"""Which tile sizes a Triton launch uses, per GPU: a committed table, the user's
cache, an opt-in search, and a step-down when the GPU refuses a launch.

A launcher describes its launch as `launch(blocks) -> tensors it wrote` and calls
`run(key, device, launch)`. The Blocks come from, in order:
  1. `forced(...)`, a context the search and the tests use;
  2. the committed table for this GPU, attn_kernels/triton/tuned/<gpu>.json, made by
     bench/tune_attention.py on that GPU and committed with its date and versions;
  3. the user's cache, $ATTN_KERNELS_CACHE_DIR or ~/.cache/attn_kernels/tuning-<gpu>.json,
     filled by the search;
  4. with ATTN_KERNELS_AUTOTUNE=1 and a CUDA device, a search now: every candidate of
     `candidates(key)` is launched on the caller's own tensors and timed (median of
     triton.testing.do_bench); a candidate whose output differs from the first
     guess's is dropped; the fastest is written to the cache, so no one pays twice;
  5. the first guess of launch_config.py.
A key is (kernel, dtype, padded head dim, banded, masked): fp16 and bf16 share entries
(same tiles, same instructions); causal / sliding-window launches have their own, and
so do launches with a user mask or dropout (a value loaded or drawn per score: they
need smaller tiles to stay in registers).
If the GPU refuses the chosen tiles (Triton's OutOfResources: shared memory or
registers over the limit, e.g. an H100 table on a GPU with 99 KiB of shared memory),
the launch steps down to smaller ones and remembers what ran, for this process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import threading
from dataclasses import fields, replace
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

import torch

from .launch_config import Blocks, dq_blocks, forward_blocks, head_block, interpreting, key_major_blocks

TABLE_DIR = Path(__file__).resolve().parent / "tuned"
KINDS = ("fwd", "dkdv", "dq", "weights")  # which kernel; "dq" and "weights" are query-major like "fwd"


class Key(NamedTuple):
    kind: str
    dtype: str  # "16bit" (fp16 and bf16) or "fp32"
    dim: int  # padded head dim (launch_config.head_block of max(E, Ev))
    banded: bool  # causal or sliding window: fewer key tiles per query tile
    masked: bool = False  # a user mask or dropout: a per-score load / draw that needs registers

    @staticmethod
    def of(kind: str, dtype: torch.dtype, dim: int, banded: bool, masked: bool = False) -> "Key":
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return Key(kind, "fp32" if dtype == torch.float32 else "16bit", head_block(dim), bool(banded), bool(masked))

    def name(self) -> str:
        name = f"{self.kind}/{self.dtype}/d{self.dim}/{'banded' if self.banded else 'full'}"
        return name + "/masked" if self.masked else name


def default(key: Key) -> Blocks:
    """The first guess (launch_config.py), used when no table or cache has the key."""
    dtype = torch.float32 if key.dtype == "fp32" else torch.bfloat16
    if key.kind == "dkdv":
        return key_major_blocks(key.dim, dtype)
    pick = dq_blocks if key.kind == "dq" else forward_blocks
    return pick(key.dim, dtype, masked=key.masked)


def candidates(key: Key) -> list:
    """The search space: the first guess, then tiles that fit an sm_90 SM at this head
    dim (shared memory grows with BLOCK x dim x stages). Every one of them must give
    the same result; tests/test_tuning.py checks each in the interpreter."""
    wide = key.dtype == "fp32"
    big = key.dim >= 256
    if key.kind == "dkdv":  # BLOCK_N keys resident, BLOCK_M queries streamed
        resident = (32, 64) if (wide or big) else (64, 128)
        streamed = (16, 32) if (wide or big) else (32, 64)
    else:  # BLOCK_M queries resident, BLOCK_N keys streamed
        resident = (32, 64) if (wide or big) else (64, 128)
        streamed = (16, 32) if wide else ((32, 64) if big else (32, 64, 128))
    stages = (1, 2) if (wide or big) else (2, 3, 4)
    found = [default(key)]
    for r in resident:
        for s in streamed:
            for warps in (4, 8):
                for st in stages:
                    bm, bn = (s, r) if key.kind == "dkdv" else (r, s)
                    blocks = Blocks(bm, bn, warps, st)
                    if blocks not in found and (warps == 4 or max(bm, bn) >= 128):
                        found.append(blocks)
    return found


def smaller(blocks: Blocks) -> Optional[Blocks]:
    """The next thing to try when a GPU refuses `blocks`: one pipeline stage less, then
    half the larger tile. None when nothing smaller is left."""
    if blocks.num_stages > 1:
        return replace(blocks, num_stages=blocks.num_stages - 1)
    if max(blocks.BLOCK_M, blocks.BLOCK_N) <= 16:
        return None
    if blocks.BLOCK_M >= blocks.BLOCK_N:
        return replace(blocks, BLOCK_M=blocks.BLOCK_M // 2, num_warps=min(blocks.num_warps, 4))
    return replace(blocks, BLOCK_N=blocks.BLOCK_N // 2, num_warps=min(blocks.num_warps, 4))


# ----------------------------------------------------------------------------------
# where choices come from

_lock = threading.Lock()
_forced: dict = {}  # kind -> Blocks, inside `forced`
_ran: dict = {}  # (gpu, key) -> Blocks that launched in this process
_files: dict = {}  # path -> {key name: Blocks}


def gpu_name(device: torch.device) -> str:
    """A file-name-safe GPU name: "nvidia-h100-80gb-hbm3"; "cpu" for the interpreter."""
    if device.type != "cuda":
        return device.type
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:  # once per device, not once per launch
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(index).lower()).strip("-")


def cache_path(gpu: str) -> Path:
    root = os.environ.get("ATTN_KERNELS_CACHE_DIR") or os.path.join(Path.home(), ".cache", "attn_kernels")
    return Path(root) / f"tuning-{gpu}.json"


def table_path(gpu: str) -> Path:
    return TABLE_DIR / f"{gpu}.json"


def _read(path: Path) -> tuple:
    """({key name: Blocks}, {key name: variant name}) of a table or cache file, read once
    per process (until written here or `forget`); empty when missing or unreadable."""
    if path not in _files:
        try:
            entries = json.loads(path.read_text())["configs"]
            _files[path] = ({name: Blocks(*(entry[f.name] for f in fields(Blocks))) for name, entry in entries.items()},
                            {name: entry["variant"] for name, entry in entries.items() if entry.get("variant")})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            _files[path] = ({}, {})
    return _files[path]


def read_configs(path: Path) -> dict:
    """{key name: Blocks} from a table or cache file; {} when it is missing or unreadable."""
    return _read(path)[0]


def read_variants(path: Path) -> dict:
    """{key name: variant name} of the entries of a table that name a kernel variant
    (bench/ab_variants.py --write-table); {} when none, or missing / unreadable."""
    return _read(path)[1]


def forget(path: Path) -> None:
    """Drop what was read from `path` (it was just written), so the next read sees the file."""
    _files.pop(path, None)


def write_config(path: Path, key: Key, blocks: Blocks, header: dict, **timing) -> None:
    """Add one entry to a table / cache file (created with `header` when new);
    `timing`: ms of the chosen tiles and of the first guess, as measured."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = dict(header, configs={})
    data.setdefault("configs", {})[key.name()] = dict(
        BLOCK_M=blocks.BLOCK_M, BLOCK_N=blocks.BLOCK_N, num_warps=blocks.num_warps,
        num_stages=blocks.num_stages, **{k: None if v is None else round(v, 5) for k, v in timing.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file
    forget(path)


def versions() -> dict:
    import triton

    return {"triton": triton.__version__, "torch": torch.__version__, "cuda": torch.version.cuda}


@contextlib.contextmanager
def forced(**by_kind: Blocks) -> Iterator[None]:
    """Within the block, launches of these kinds use these Blocks (no table, no search)."""
    with _lock:
        saved = dict(_forced)
        _forced.update(by_kind)
    try:
        yield
    finally:
        with _lock:
            _forced.clear()
            _forced.update(saved)


def autotune_enabled() -> bool:
    return os.environ.get("ATTN_KERNELS_AUTOTUNE", "0") == "1"


def choose(key: Key, gpu: str) -> tuple:
    """-> (Blocks, where they came from), without searching."""
    if key.kind in _forced:
        return _forced[key.kind], "forced"
    if (gpu, key) in _ran:
        return _ran[(gpu, key)], "this process"
    if gpu != "cpu":
        for source, path in (("table", table_path(gpu)), ("cache", cache_path(gpu))):
            found = read_configs(path).get(key.name())
            if found is not None:
                return found, source
    return default(key), "default"


# ----------------------------------------------------------------------------------
# launching

def _out_of_resources() -> type:
    from triton.runtime.errors import OutOfResources

    return OutOfResources


def launch_stepping_down(blocks: Blocks, launch: Callable) -> Blocks:
    """Launch with `blocks`, or with the first smaller tiles the GPU accepts; -> what ran."""
    refused = _out_of_resources()
    while True:
        try:
            launch(blocks)
            return blocks
        except refused:
            blocks = smaller(blocks)
            if blocks is None:
                raise


def _same_result(got: tuple, want: tuple) -> bool:
    """A candidate's outputs against the first guess's: equal up to the rounding that a
    different summation order brings (fp32 accumulation, P rounded per tile)."""
    for g, w in zip(got, want):
        if g is None:
            continue
        tol = 1e-3 if w.dtype in (torch.float32, torch.float64) else 2e-2  # 16-bit outputs: a few ulps
        g, w = g.float(), w.float()
        finite = torch.isfinite(w)
        if not torch.equal(finite, torch.isfinite(g)):
            return False
        scale = w[finite].abs().max().clamp_min(1.0) if finite.any() else 1.0
        if finite.any() and (g[finite] - w[finite]).abs().max() > tol * scale:
            return False
    return True


def search(key: Key, launch: Callable, timer: Callable, space: Optional[list] = None) -> tuple:
    """Time every candidate on the caller's tensors; -> (fastest Blocks, its time, the
    first guess's time or None if the GPU refused it).

    `launch(blocks)` returns the tensors it wrote (None entries are ignored);
    `timer(fn)` returns a time for fn (do_bench's median on a GPU). Candidates the GPU
    refuses, and candidates whose output is not the first launched one's, are skipped.
    """
    refused = _out_of_resources()
    space = space or candidates(key)
    want = None
    times = {}
    for blocks in space:
        try:
            got = tuple(t.clone() if t is not None else None for t in launch(blocks))
        except refused:
            continue
        if want is None:
            want = got
        elif not _same_result(got, want):
            continue
        times[blocks] = timer(lambda: launch(blocks))
    if not times:
        raise RuntimeError(f"no candidate launched for {key.name()}")
    best = min(times, key=times.get)
    return best, times[best], times.get(default(key))


def _cuda_timer(fn: Callable) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=30, return_mode="median")


def _capturing() -> bool:
    """Inside CUDA-graph capture no search runs: timing needs synchronisation."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def gpu_of(device: torch.device) -> str:
    """The name tables are filed under; "cpu" in the interpreter, which reads none."""
    return "cpu" if interpreting() else gpu_name(device)


def run(key: Key, device: torch.device, launch: Callable, preferred: Optional[Blocks] = None) -> Blocks:
    """Launch with the tiles this GPU should use for `key` (see the module docstring);
    -> the Blocks that ran. `preferred`: the tiles a kernel variant is defined by
    (variants.tiles), used instead of table, cache and search (but not over `forced`)."""
    gpu = gpu_of(device)
    blocks, source = choose(key, gpu)
    if preferred is not None and source != "forced":
        blocks, source = preferred, "variant"
    if source == "default" and gpu != "cpu" and autotune_enabled() and not _capturing():
        blocks, ms, default_ms = search(key, launch, _cuda_timer)
        write_config(cache_path(gpu), key, blocks, dict(gpu=torch.cuda.get_device_name(device), **versions()),
                     ms=ms, default_ms=default_ms)
    ran = launch_stepping_down(blocks, launch)
    if source not in ("forced", "variant"):  # a variant's tiles are not this key's for other variants
        with _lock:
            _ran[(gpu, key)] = ran
    return ran

"""Which kernel variant a Triton launch runs, and why: the one place to look.

A variant is a compile-time choice of how a kernel computes the same result (the
tiles it visits, how it masks), never what it computes. Each launch asks
`select(key, device)` and gets a `Choice(name, reason)`, from, in order:
  1. ATTN_KERNELS_TRITON_VARIANT=<name> (tests, benchmarks; "auto" or unset: go on);
     an unknown name is a ValueError that lists the names;
  2. the tile table attn_kernels/triton/tuned/<gpu>.json, whose entry for the key
     may hold "variant" (written by `bench/ab_variants.py --write-table` from a
     measurement on that GPU);
  3. "baseline": today's kernels stay the default until a GPU measurement says otherwise.
A launcher calls `plan(key, device, flags)`: whether to split its loop into
interior and edge tiles (`interior_split`: a variant only changes kernels whose
score modifiers it supports, otherwise the launch runs the edge path everywhere and
the recorded reason says so) and the tiles the variant is defined by (`tiles`,
handed to tuning.run, which otherwise takes the tile table or the first guess).
A backward first asks `onepass(key, device, deterministic)`: whether variant "onepass"
replaces its 3 kernels by one (never with deterministic=True; recorded as kind "bwd").
The forward asks `forward_plan(...)` instead: `plan` plus `tensor_descriptors` (variants
"tma" and "ws": TMA where the strides allow, else the pointer path with the reason
recorded) and `warp_specialized` (variant "ws": its non-causal loop; NotImplementedError
below sm_100), from one selection.

`last_choices()` returns what the latest launch of each kind chose (for benchmarks
and tests: which variant really ran).
"""

from __future__ import annotations

import os
import threading
from typing import NamedTuple

import torch

from . import launch_config, tuning

ENV = "ATTN_KERNELS_TRITON_VARIANT"

# name -> one line: what changes in the kernels
VARIANTS = {
    "baseline": "the original kernels: every tile evaluates masks and bounds (tiling.scores_base2)",
    "interior": "F1: key/query loops split into mask-free interior tiles (scale folded into one FMA) and "
                "edge tiles (causal diagonal, window edges, ragged last tile); user masks, ALiBi and "
                "softcap keep the edge path everywhere",
    "wide": "F2: the baseline kernels with wide tiles for 16-bit inputs (FlashAttention-3's 128 x 128): "
            "forward 128x128 at D <= 128, dK/dV and dQ 64x128 (queries x keys) at D <= 64, 8 warps, 2 stages; "
            "elsewhere as baseline (where these spill on sm_90: the backward at D = 128, and with F1's split loops)",
    "onepass": "B1: one backward kernel per key block, dQ summed by fp32 atomic adds (5 matmuls per tile instead of "
               "7); not bit-reproducible, so deterministic=True keeps the 3-kernel path; forward as baseline",
    "tma": "F3: the baseline forward with Q/K/V loads and the O store through host-side tensor descriptors "
           "(TMA on sm_90+), one 4-D (Z, H, N, D) descriptor per tensor so a tile's bounds are its own "
           "(batch, head)'s; 16-bit inputs only; the pointer path for float32, where strides forbid it or "
           "for packed (varlen) batches; "
           "backward as baseline",
    "ws": "F4: the tma forward with its non-causal key loop warp-specialised (tl.range(warp_specialize=True): "
          "producer warps issue the TMA loads, consumer warps the MMAs and softmax); Triton 3.6 and 3.9 apply "
          "it on sm_100+ only, so on sm_90 and older it refuses with NotImplementedError; causal / banded "
          "loops and shapes without descriptors run unspecialised; backward as baseline",
}

# variant -> {kernel kind: ((BLOCK_M, BLOCK_N, num_warps, num_stages), largest padded D)}, 16-bit inputs;
# the limits are where bench/kernel_resources.py shows no spills on sm_90 (bench/results/static/)
_TILES = {
    "wide": {"fwd": ((128, 128, 8, 2), 128), "dkdv": ((64, 128, 8, 2), 64), "dq": ((64, 128, 8, 2), 64)},
    # the one-pass kernel (its key is the dK/dV one): 128 keys per program halve the dQ atomics of 64;
    # with 4 warps (the dK/dV first guess) it spills 8-80 B on sm_90
    "onepass": {"dkdv": ((32, 128, 8, 2), 128)},
}
# variants that split the loops into interior and edge tiles
_SPLIT = ("interior",)
# variants that replace the 3-kernel backward by one kernel (attention_bwd_onepass.py)
_ONEPASS = ("onepass",)
# variants that change only the forward kernel (a backward under them runs the baseline)
_FORWARD_ONLY = ("tma", "ws")
# variants whose forward reads and writes through tensor descriptors (where strides allow)
_DESCRIPTORS = ("tma", "ws")
# the first compute capability (x10) on which Triton 3.6 / 3.9 warp-specialise a loop: their Hopper pass
# leaves the loop unchanged at 8 warps and fails to compile at 4 (tests/test_triton_hopper_variants.py)
WS_MIN_ARCH = 100


class Choice(NamedTuple):
    name: str  # a key of VARIANTS
    reason: str  # where the choice came from, in words


def names() -> tuple:
    return tuple(VARIANTS)


def forced_name() -> str | None:
    """The variant named by ATTN_KERNELS_TRITON_VARIANT, or None when unset / "auto"."""
    value = os.environ.get(ENV, "").strip()
    if value in ("", "auto"):
        return None
    if value not in VARIANTS:
        raise ValueError(f"{ENV}={value!r} is not a Triton kernel variant; choose one of "
                         f"{', '.join(VARIANTS)} (or 'auto')")
    return value


def table_variant(key: tuning.Key, gpu: str) -> str | None:
    """The variant the tile table of `gpu` records for `key`, or None."""
    if gpu == "cpu":  # the interpreter reads no table (as tuning.choose)
        return None
    name = tuning.read_variants(tuning.table_path(gpu)).get(key.name())
    if name is None:
        return None
    if name not in VARIANTS:
        raise ValueError(f"{tuning.table_path(gpu)}: entry {key.name()} names variant {name!r}, "
                         f"which this version does not have ({', '.join(VARIANTS)})")
    return name


_lock = threading.Lock()
_last: dict = {}  # kind -> Choice of the latest launch


def select(key: tuning.Key, device: torch.device) -> Choice:
    """The variant a launch of `key` on `device` runs: env > tile table > baseline."""
    name = forced_name()
    if name is not None:
        choice = Choice(name, f"forced by {ENV}")
    else:
        gpu = tuning.gpu_of(device)
        name = table_variant(key, gpu)
        if name is not None:
            choice = Choice(name, f"tile table {tuning.table_path(gpu).name} ({key.name()})")
        else:
            choice = Choice("baseline", "default (no forced variant, no table entry)")
    return choice


def record(kind: str, choice: Choice) -> Choice:
    with _lock:
        _last[kind] = choice
    return choice


def last_choices() -> dict:
    """{kernel kind: Choice} of the latest launch of each kind in this process."""
    with _lock:
        return dict(_last)


def interior_split(kind: str, choice: Choice, constexprs: dict) -> bool:
    """Whether the kernel splits its loop into interior and edge tiles (variant
    "interior"), given the launch's score-modifier flags (launch.ScoreMods.constexprs).
    User masks, ALiBi and softcap change every score, so they keep the edge path:
    the launch then runs the baseline code, and the recorded reason says so."""
    if choice.name not in _SPLIT:
        record(kind, choice)
        return False
    blocking = [flag for flag in ("HAS_ALIBI", "SOFTCAP") if constexprs.get(flag)]
    if constexprs.get("MASK_KIND", 0) != 0:
        blocking.insert(0, "attn_mask")
    if blocking:
        record(kind, Choice("baseline", f"{choice.reason}: {choice.name!r} asked, edge path everywhere "
                                        f"because of {', '.join(blocking)}"))
        return False
    record(kind, choice)
    return True


def tiles(choice: Choice, key: tuning.Key):
    """The Blocks variant `choice` is defined by for `key`, or None (the tile table /
    first guess decides): 16-bit inputs only, up to the head dim each kind allows, and
    not with a user mask or dropout (key.masked: the first guess's smaller tiles hold
    the per-score loads without spilling; these spilled 48-876 B there on sm_90)."""
    by_kind = _TILES.get(choice.name, {})
    if key.kind not in by_kind or key.dtype != "16bit" or key.dim > by_kind[key.kind][1] or key.masked:
        return None
    return tuning.Blocks(*by_kind[key.kind][0])


def plan(key: tuning.Key, device: torch.device, constexprs: dict) -> tuple:
    """What a launcher needs: (split into interior / edge tiles?, the variant's Blocks or
    None), for a launch of `key` with these score-modifier flags; recorded for
    `last_choices`."""
    return _plan(key, select(key, device), constexprs)


def forward_plan(key: tuning.Key, device: torch.device, constexprs: dict, tensors: dict) -> tuple:
    """The forward launcher's `plan`, from one selection: (interior split?, the variant's
    Blocks or None, tensor descriptors?, warp-specialised?); `tensors` are its (Z, H, N, D)
    kernel views ({"q": q, ...}, None entries skipped). The last record says what ran."""
    choice = select(key, device)
    interior, blocks = _plan(key, choice, constexprs)
    descriptors = tensor_descriptors(key, choice, constexprs, tensors)
    return interior, blocks, descriptors, warp_specialized(key, choice, constexprs, descriptors)


def _plan(key: tuning.Key, choice: Choice, constexprs: dict) -> tuple:
    if choice.name in _ONEPASS:  # a forward, or a backward that `onepass` kept on the 3 kernels
        choice = Choice("baseline", f"{choice.reason}: {choice.name!r} changes only the one-pass backward; "
                                    f"this launch runs the baseline kernel")
    if choice.name in _FORWARD_ONLY and key.kind != "fwd":
        choice = Choice("baseline", f"{choice.reason}: {choice.name!r} changes only the forward; "
                                    f"this launch runs the baseline kernel")
    return interior_split(key.kind, choice, constexprs), tiles(choice, key)


def descriptor_blocker(t: torch.Tensor) -> str | None:
    """Why tensor `t` (a (Z, H, N, D) kernel view) cannot be read through a TMA
    descriptor, or None when it can: the base must be 16-byte aligned, every stride
    but the last a non-zero multiple of 16 bytes (0, a broadcast, is left to the
    pointer path), the last dim contiguous."""
    size = t.element_size()
    if t.data_ptr() % 16:
        return "base not 16-byte aligned"
    if t.stride(-1) != 1:
        return f"last dim not contiguous (stride {t.stride(-1)})"
    bad = [s for s in t.stride()[:-1] if s == 0 or (s * size) % 16]
    if bad:
        return f"strides {tuple(t.stride())} (elements of {size} B) not all non-zero multiples of 16 bytes"
    return None


def tensor_descriptors(key: tuning.Key, choice: Choice, constexprs: dict, tensors: dict) -> bool:
    """Whether the forward launch of `key`, under variant `choice`, reads Q/K/V and writes O
    through tensor descriptors (variants "tma", "ws"; 16-bit inputs only), given its
    (Z, H, N, D) kernel views `tensors` and its score-modifier flags; recorded for
    `last_choices` (replacing what `_plan` recorded for this launch). Packed (varlen)
    batches keep the pointer path: a descriptor's bounds would be the packed tensor's,
    so a ragged tile would read, and its store clip at, the next sequence's rows."""
    if choice.name not in _DESCRIPTORS or key.kind != "fwd":
        return False
    blockers = []
    if key.dtype == "fp32":  # IEEE fp32 dots are FMA loops: with descriptor loads they spilled 0.6-3 KiB on sm_90
        blockers.append("float32 inputs (descriptors only for 16-bit inputs)")
    if constexprs.get("VARLEN"):
        blockers.append("packed (varlen) batch: a descriptor cannot bound a tile to its sequence")
    for name, t in tensors.items():
        why = None if t is None else descriptor_blocker(t)
        if why:
            blockers.append(f"{name}: {why}")
    if blockers:
        also = ", and no warp specialisation (it needs the descriptors)" if choice.name == "ws" else ""
        record(key.kind, Choice("baseline", f"{choice.reason}: {choice.name!r} asked, pointer loads because "
                                            f"{'; '.join(blockers)}{also}"))
        return False
    record(key.kind, choice)
    return True


def onepass(key: tuning.Key, device: torch.device, deterministic: bool) -> bool:
    """Whether a backward launch of `key` (kind "dkdv") runs the one-pass kernel (variant
    "onepass": dQ by atomics) instead of the 3 kernels; recorded as kind "bwd". Never
    with deterministic=True: the atomics' order, so dQ's last bits, changes run to run."""
    choice = select(key, device)
    if choice.name in _FORWARD_ONLY:
        choice = Choice("baseline", f"{choice.reason}: {choice.name!r} changes only the forward")
    if choice.name not in _ONEPASS:
        record("bwd", choice)
        return False
    if deterministic:
        record("bwd", Choice("baseline", f"{choice.reason}: {choice.name!r} asked, the 3-kernel backward "
                                         f"because deterministic=True (dQ by atomics is not bit-reproducible)"))
        return False
    record("bwd", choice)
    return True


def _target_arch():
    """Compute capability x10 of the GPU Triton compiles for (the stand-in driver's under
    bench/kernel_resources.py), or None when it is not an NVIDIA GPU."""
    from triton.runtime import driver

    target = driver.active.get_current_target()
    return target.arch if target.backend == "cuda" else None


def warp_specialized(key: tuning.Key, choice: Choice, constexprs: dict, descriptors: bool) -> bool:
    """Whether the forward launch of `key`, under variant `choice`, warp-specialises its key
    loop (variant "ws"), given whether it got tensor descriptors (`tensor_descriptors`); recorded for
    `last_choices`. Raises NotImplementedError on a GPU below sm_100, where the installed
    Triton would silently leave the loop unspecialised (or fail to compile it). The
    interpreter runs the loop as written (it ignores warp_specialize): correctness only."""
    if choice.name != "ws" or key.kind != "fwd":
        return False
    if not launch_config.interpreting():
        arch = _target_arch()
        if arch is None or arch < WS_MIN_ARCH:
            import triton

            where = f"sm_{arch}" if arch is not None else "a non-NVIDIA GPU"
            raise NotImplementedError(
                f"kernel variant 'ws' (warp specialisation, {choice.reason}) needs an NVIDIA GPU of compute "
                f"capability >= {WS_MIN_ARCH // 10}.0: on {where}, Triton {triton.__version__} does not apply "
                f"warp_specialize (Triton 3.6 and 3.9 leave the loop unchanged at 8 warps and fail to compile it at "
                f"4 on sm_90); choose another variant ({', '.join(n for n in VARIANTS if n != 'ws')})")
    if not descriptors:  # tensor_descriptors recorded why
        return False
    if constexprs.get("BAND_LO") or constexprs.get("BAND_HI"):
        record(key.kind, Choice("tma", f"{choice.reason}: 'ws' asked, descriptors only: the causal / banded "
                                       f"key loop is not warp-specialised"))
        return False
    record(key.kind, choice)
    return True

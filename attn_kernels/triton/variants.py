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

`last_choices()` returns what the latest launch of each kind chose (for benchmarks
and tests: which variant really ran).
"""

from __future__ import annotations

import json
import os
import threading
from typing import NamedTuple

import torch

from . import tuning

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
    try:
        entry = json.loads(tuning.table_path(gpu).read_text())["configs"][key.name()]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    name = entry.get("variant") if isinstance(entry, dict) else None
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
    first guess decides): 16-bit inputs only, up to the head dim each kind allows."""
    by_kind = _TILES.get(choice.name, {})
    if key.kind not in by_kind or key.dtype != "16bit" or key.dim > by_kind[key.kind][1]:
        return None
    return tuning.Blocks(*by_kind[key.kind][0])


def plan(key: tuning.Key, device: torch.device, constexprs: dict) -> tuple:
    """What a launcher needs: (split into interior / edge tiles?, the variant's Blocks or
    None), for a launch of `key` with these score-modifier flags; recorded for
    `last_choices`."""
    choice = select(key, device)
    if choice.name in _ONEPASS:  # a forward, or a backward that `onepass` kept on the 3 kernels
        choice = Choice("baseline", f"{choice.reason}: {choice.name!r} changes only the one-pass backward; "
                                    f"this launch runs the baseline kernel")
    return interior_split(key.kind, choice, constexprs), tiles(choice, key)


def onepass(key: tuning.Key, device: torch.device, deterministic: bool) -> bool:
    """Whether a backward launch of `key` (kind "dkdv") runs the one-pass kernel (variant
    "onepass": dQ by atomics) instead of the 3 kernels; recorded as kind "bwd". Never
    with deterministic=True: the atomics' order, so dQ's last bits, changes run to run."""
    choice = select(key, device)
    if choice.name not in _ONEPASS:
        record("bwd", choice)
        return False
    if deterministic:
        record("bwd", Choice("baseline", f"{choice.reason}: {choice.name!r} asked, the 3-kernel backward "
                                         f"because deterministic=True (dQ by atomics is not bit-reproducible)"))
        return False
    record("bwd", choice)
    return True

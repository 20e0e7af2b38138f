"""Argument checks shared by the context-parallel schemes.

Order matters: the cross-rank check runs first (one small all-gather that every
rank reaches), so that shapes or flags that differ between ranks raise the same
ValueError everywhere instead of leaving some ranks waiting in a collective;
after it the arguments agree, and every local check below raises on all ranks
or on none.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from .._checks import BACKENDS, check_attention
from ._comm import check_same_on_ranks, dtype_code, process_group, shape_field
from .sharding import LAYOUTS, check_layout, check_local_length

_UNKNOWN = -3.0  # a value that is not a number (its own check names it later)


def _num(x) -> float:
    return float(x) if isinstance(x, numbers.Real) else _UNKNOWN


def _pair(x) -> tuple:
    return tuple(_num(v) for v in x) if isinstance(x, (tuple, list)) and len(x) == 2 else (_UNKNOWN, _UNKNOWN)


def _index(x, choices) -> float:
    return float(choices.index(x)) if isinstance(x, str) and x in choices else _UNKNOWN


@dataclass(frozen=True)
class Call:
    """One validated call: the group and the arguments every block call needs."""

    op: str
    group: object
    rank: int
    world: int
    layout: str
    is_causal: bool
    scale: float
    enable_gqa: bool
    window: tuple
    softcap: float
    backend: str
    return_lse: bool

    def attention_kwargs(self) -> dict:
        """Keyword arguments of the single-device call that the scheme wraps."""
        return dict(scale=self.scale, softcap=self.softcap, backend=self.backend)


def validate(op, query, key, value, *, group, layout, is_causal, scale, enable_gqa, window_size, softcap, backend,
             return_lse, extra: Optional[dict] = None) -> Call:
    """Check a scheme's arguments on this rank and across ranks; `extra` adds fields
    (name -> tuple of numbers) that must also agree across ranks."""
    group, rank, world = process_group(group, op)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    fields = {
        "query.shape": shape_field(query), "key.shape": shape_field(key), "value.shape": shape_field(value),
        "query.dtype": (dtype_code(query.dtype),), "is_causal": (_num(is_causal),),
        "layout": (_index(layout, LAYOUTS),), "scale": (_UNKNOWN if scale is None else _num(scale),),
        "enable_gqa": (_num(enable_gqa),), "window_size": _pair(window_size), "softcap": (_num(softcap),),
        "backend": (_index(backend, BACKENDS),), "return_lse": (_num(return_lse),),
    }
    check_same_on_ranks(op, group, world, {**fields, **(extra or {})}, query)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be this rank's shard (B, H, L_local, D), got shape {tuple(t.shape)}")
    check_layout(layout)
    if not isinstance(return_lse, bool):
        raise TypeError(f"{op}: return_lse must be a bool, got {type(return_lse).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    for name, t in (("key", key), ("value", value)):
        if t.shape[0] != query.shape[0]:  # the schemes index batch rows of every shard
            raise ValueError(f"{op}: {name} batch size {t.shape[0]} must equal query's {query.shape[0]} "
                             "(no batch broadcasting across ranks)")
    spec = check_attention(query, key, value, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                           window_size=window_size, softcap=softcap)
    check_local_length(op, "query", query.shape[2], layout, world)
    check_local_length(op, "key", key.shape[2], layout, world)
    return Call(op, group, rank, world, layout, spec.is_causal, spec.scale, enable_gqa, spec.window, spec.softcap,
                backend, return_lse)


def require_self_attention(call: Call, query: torch.Tensor, key: torch.Tensor, what: str) -> None:
    """Causal masks and windows in global positions need L == S (the same positions for queries and keys)."""
    if query.shape[2] != key.shape[2]:
        raise NotImplementedError(
            f"{call.op}: {what} needs query and key shards of the same length (self-attention); "
            f"got L_local={query.shape[2]}, S_local={key.shape[2]}"
        )

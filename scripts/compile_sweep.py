"""Compile every Triton kernel for a GPU that is not here, across the call matrix the
GPU tests reach, so that a kernel that cannot compile for it (a dot too small, shared
memory over the limit, a Triton version's lowering bug) shows on CPU, before any GPU
minute is spent on it.

    python scripts/compile_sweep.py [--arch 90] [--quick] [--out FILE]
    PYTHONPATH=/path/to/triton-3.6 python scripts/compile_sweep.py   # the GPU machines' Triton

With --max-spill N, a kernel spilling more than N bytes fails its case.

Each case runs the launchers of attn_kernels/triton (launch.forward / backward /
weights, the decode and dropout-mask launchers) on CPU tensors under
bench/kernel_resources.py's stand-in driver: every launch compiles its kernel to a
cubin for sm_<arch> exactly as the JIT would on that GPU (ptxas included), and
nothing runs. Per case: the kernels compiled, their registers / spills / shared
memory, or the error. Cases: every feature (causal, windows, bool and float masks with
the mask gradient, ALiBi, softcap, dropout, varlen, GQA, Ev != E, the lse gradient) in
three dtypes at D = 64 and an odd D; plain and causal at every head-dim class; weights,
decode (contiguous and paged) and the dropout mask; plain / causal / varlen / bool mask / dropout for every
kernel variant (variants.py). Exit status 1 when any case fails or over-uses shared
memory. Compile-only: says nothing of speed or of results.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import torch  # noqa: E402

DTYPES = ("float16", "bfloat16", "float32")
FEATURES = ("plain", "causal", "window", "bool_mask", "float_mask_grad", "alibi", "softcap", "dropout",
            "varlen_causal", "gqa", "ev_ne_e", "lse_grad")
DIMS = (16, 24, 64, 80, 96, 128, 192, 256)  # 24, 80, 96, 192: padded head dims


def _attention_case(dtype: torch.dtype, dim: int, feature: str, backward: bool) -> Callable[[], None]:
    """A launch of the forward (and the backward kernels) of one feature combination."""
    from attn_kernels.triton import launch

    hq, hkv = (4, 2) if feature == "gqa" else (2, 2)
    dim_v = dim // 2 if feature == "ev_ne_e" and dim >= 32 else dim
    seq = 100  # ragged: the last tile is partial
    kw: dict = {}
    packed: Optional[launch.Packed] = None
    if feature == "varlen_causal":
        cu = torch.tensor([0, 37, 100], dtype=torch.int32)
        packed = launch.Packed(cu, cu, 63, 63)
        q, k, v = (torch.empty(100, h, d, dtype=dtype) for h, d in ((hq, dim), (hkv, dim), (hkv, dim_v)))
        lse = torch.empty(hq, 100)
        kw.update(band=(None, 0), packed=packed)
    else:
        q, k, v = (torch.empty(2, h, seq, d, dtype=dtype) for h, d in ((hq, dim), (hkv, dim), (hkv, dim_v)))
        lse = torch.empty(2, hq, seq)
    if feature == "causal":
        kw["band"] = (None, 0)
    elif feature == "window":
        kw["band"] = (-17, 5)
    elif feature == "bool_mask":
        kw["mask"] = torch.empty(2, 1, seq, seq, dtype=torch.bool).expand(2, hq, seq, seq)
    elif feature == "float_mask_grad":
        kw["mask"] = torch.empty(2, hq, seq, seq, dtype=dtype)
    elif feature == "alibi":
        kw["alibi"] = torch.empty(2, hq, dtype=torch.float32)
    elif feature == "softcap":
        kw["softcap"] = 30.0
    elif feature == "dropout":
        kw.update(seed=torch.zeros(1, dtype=torch.int64), dropout_p=0.1)
    mods = launch.score_mods(q, dim ** -0.5, **kw)

    def run():
        out, _ = launch.forward(q, k, v, mods, packed)
        if backward:
            dlse = torch.empty_like(lse) if feature == "lse_grad" else None
            launch.backward(torch.empty_like(out), q, k, v, out, lse, dlse, mods, packed,
                            need_ds=feature == "float_mask_grad")

    return run


def _weights_case(dtype: torch.dtype, dim: int, causal: bool) -> Callable[[], None]:
    from attn_kernels.triton import launch

    q, k = torch.empty(2, 4, 100, dim, dtype=dtype), torch.empty(2, 2, 70, dim, dtype=dtype)
    mods = launch.score_mods(q, dim ** -0.5, band=(None, 30) if causal else (None, None))
    return lambda: launch.weights(q, k, mods)


def _decode_case(dtype: torch.dtype, dim: int, paged: bool) -> Callable[[], None]:
    from attn_kernels.triton import attention_decode

    qd = torch.empty(2, 1, 4, dim, dtype=dtype)
    cache = torch.empty(8, 16, 2, dim, dtype=dtype) if paged else torch.empty(2, 128, 2, dim, dtype=dtype)
    table = torch.zeros(2, 4, dtype=torch.int32) if paged else None
    seqlens = torch.tensor([10, 50], dtype=torch.int32)
    out, lse = torch.empty(2, 1, 4, dim, dtype=dtype), torch.empty(2, 4, 1)
    _, block_n, _ = attention_decode.decode_blocks(2, dim, dtype)
    kw = dict(num_splits=2, split_len=2 * block_n, scale=0.1, is_causal=True, window=(-1, -1), softcap=0.0)
    return lambda: attention_decode.attention_decode(qd, cache, cache, seqlens, table, None, out, lse, **kw)


def _dropout_mask_case() -> Callable[[], None]:
    from attn_kernels.triton import dropout_mask

    return lambda: dropout_mask.dropout_mask(torch.zeros(1, dtype=torch.int64), 2, 4, 100, 70, 0.1, "cpu")


def cases(quick: bool = False) -> list:
    """[(name, variant or None, launch)] in the order they are compiled."""
    from attn_kernels.triton import variants

    out = []
    dtypes = DTYPES if not quick else ("bfloat16", "float32")
    feats = FEATURES if not quick else ("causal", "float_mask_grad", "varlen_causal", "gqa", "ev_ne_e")
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for dim in ((64, 80) if not quick else (80,)):
            for feat in feats:
                out.append((f"fwd+bwd {dtype_name} D={dim} {feat}", None, _attention_case(dtype, dim, feat, True)))
        for dim in (DIMS if not quick else (24, 256)):
            for feat in ("plain", "causal"):
                if dim in (64, 80) and not quick:
                    continue  # above
                out.append((f"fwd+bwd {dtype_name} D={dim} {feat}", None, _attention_case(dtype, dim, feat, True)))
        for dim in ((24, 128) if not quick else (24,)):
            out.append((f"weights {dtype_name} D={dim}", None, _weights_case(dtype, dim, causal=dim == 24)))
            for paged in (False, True):
                out.append((f"decode {dtype_name} D={dim}{' paged' if paged else ''}", None,
                            _decode_case(dtype, dim, paged)))
    out.append(("dropout mask", None, _dropout_mask_case()))
    for name in variants.names():
        if name == "baseline":
            continue
        for dim in ((64, 128) if not quick else (128,)):
            for feat in ("plain", "causal", "varlen_causal", "bool_mask", "dropout"):
                out.append((f"fwd+bwd bfloat16 D={dim} {feat}", name, _attention_case(torch.bfloat16, dim, feat, True)))
    return out


def run_case(name: str, variant: Optional[str], launch: Callable[[], None], arch: int,
             max_spill: Optional[int] = None) -> tuple:
    """(status, lines): status 'ok', 'refused' (NotImplementedError: the variant does
    not take this target), 'over' (shared memory over the limit), 'spills' (a kernel
    spills more than max_spill bytes) or 'FAIL'."""
    from kernel_resources import _variant, measure

    label = f"[{variant}] {name}" if variant else name
    try:
        with _variant(variant):
            rows = measure(label, launch, arch)
    except NotImplementedError as exc:
        return "refused", [f"{label:<48} refused: {exc}"]
    except Exception as exc:  # noqa: BLE001 - every failure is the finding
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return "FAIL", [f"{label:<48} FAIL: {last[:400]}"]
    status = "ok" if all(r.fits for r in rows) else "over"
    if status == "ok" and max_spill is not None and any(r.spill_bytes > max_spill for r in rows):
        status = "spills"
    return status, [r.row() for r in rows] or [f"{label:<48} (no kernel launched)"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--quick", action="store_true", help="a small subset (the test suite's)")
    parser.add_argument("--out", help="also write the table here")
    parser.add_argument("-k", dest="pattern", action="append",
                        help="only the cases whose name contains this (repeat: any of them)")
    parser.add_argument("--max-spill", type=int, help="fail a case whose kernels spill more bytes than this")
    args = parser.parse_args(argv)

    import triton

    header = f"Triton {triton.__version__}, torch {torch.__version__}, compiled for sm_{args.arch} (nothing runs)"
    lines, counts = [header], {}
    print(header, flush=True)
    start = time.time()
    for name, variant, launch in cases(args.quick):
        if args.pattern and not any(p in f"[{variant}] {name}" for p in args.pattern):
            continue
        status, found = run_case(name, variant, launch, args.arch, args.max_spill)
        counts[status] = counts.get(status, 0) + 1
        for line in found:
            print(line, flush=True)
        lines += found
    summary = (f"{sum(counts.values())} cases in {time.time() - start:.0f} s: "
               + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    print(summary)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines + [summary]) + "\n")
    return 1 if any(counts.get(s) for s in ("FAIL", "over", "spills")) else 0


if __name__ == "__main__":
    sys.exit(main())

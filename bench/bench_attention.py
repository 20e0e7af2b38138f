"""Attention benchmark: attn_kernels next to naive PyTorch, SDPA's backends and FlexAttention.

    python bench/bench_attention.py            # GPU: the full grid; no GPU: a small labelled CPU run
    python bench/bench_attention.py --quick    # GPU: a subset, under 2 minutes on an H100
    python bench/bench_attention.py --seqlens 1024 4096 --headdims 128 --dtypes bf16 \
        --causal yes --passes fwd,bwd --impls sdpa.flash,attn_kernels.triton

Writes bench/results/<gpu>.json (one record per impl x pass x config), <gpu>.md
(tables) and <gpu>.png (plots); --quick runs write <gpu>-quick.*. Each implementation
is checked against the fp32 reference at the first seqlen of every (dtype, D,
causal) before it is timed. See bench/README.md.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from impls import IMPLS, default_impls
from measure import CHECK_BUDGET_BYTES, Outcome, check, check_shape, make_reference, time_cell
from measure import cpu_timer, cuda_timer, free_memory
from records import DTYPES, FA_HIDDEN, FA_TOKENS, PASSES, fa_shape, file_stem, machine_info, make_record, write_json
from plot import write_plot
from report import render_markdown

RESULTS_DIR = Path(__file__).resolve().parent / "results"
INTERPRETER_NOTE = "the Triton interpreter runs only the first seqlen (too slow for more)"

# per device and mode: what runs unless the command line says otherwise
DEFAULTS = {
    ("cuda", False): dict(seqlens=[512, 1024, 2048, 4096, 8192, 16384], headdims=[64, 128, 256],
                          dtypes=["bf16", "fp16"], tokens=FA_TOKENS, hidden=FA_HIDDEN, warmup_ms=25, rep_ms=100),
    ("cuda", True): dict(seqlens=[1024, 4096], headdims=[128], dtypes=["bf16"],
                         tokens=FA_TOKENS, hidden=FA_HIDDEN, warmup_ms=10, rep_ms=40),
    # CPU: fp32 (CPU half matmuls are slow and beside the point), 1/16 of the FA token count
    ("cpu", False): dict(seqlens=[128, 256, 512], headdims=[64], dtypes=["fp32"],
                         tokens=1024, hidden=256, warmup_ms=0, rep_ms=100),
    ("cpu", True): dict(seqlens=[128, 256], headdims=[64], dtypes=["fp32"],
                        tokens=512, hidden=256, warmup_ms=0, rep_ms=50),
}  # fmt: skip


@dataclass
class Settings:
    device: str
    seqlens: list
    headdims: list
    dtypes: list  # names: bf16, fp16, fp32
    causals: list
    passes: list
    impls: list  # names, keys of impls.IMPLS
    tokens: int
    hidden: int
    warmup_ms: float
    rep_ms: float


def _items(values, convert=str) -> list:
    """Command-line lists, space- or comma-separated: "--passes fwd,bwd" or "--seqlens 512 1024"."""
    return [convert(item) for value in values for item in value.split(",") if item]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small subset (GPU: under 2 minutes on an H100)")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when there is a GPU")
    parser.add_argument("--seqlens", nargs="+", help="sequence lengths (L = S)")
    parser.add_argument("--headdims", nargs="+", help="head dims D")
    parser.add_argument("--dtypes", nargs="+", help=f"of {', '.join(DTYPES)}")
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--passes", nargs="+", default=[",".join(PASSES)], help=f"of {', '.join(PASSES)}")
    parser.add_argument("--impls", nargs="+", help=f"of {', '.join(IMPLS)}")
    parser.add_argument("--tokens", type=int, help="batch * seqlen (default: 16384 on a GPU)")
    parser.add_argument("--hidden", type=int, help="heads * D (default: 2048 on a GPU)")
    parser.add_argument("--warmup-ms", type=float, help="do_bench warm-up per cell (default 25; --quick 10)")
    parser.add_argument("--rep-ms", type=float, help="time spent repeating each cell (GPU default 100; --quick 40)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default: bench/results)")
    parser.add_argument("--name", help="file stem of the results (default: from the GPU name, e.g. h100)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if attn_kernels errs")
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA GPU")
    base = DEFAULTS[(device, args.quick)]
    settings = Settings(
        device=device,
        seqlens=sorted(_items(args.seqlens, int)) if args.seqlens else base["seqlens"],
        headdims=_items(args.headdims, int) if args.headdims else base["headdims"],
        dtypes=_items(args.dtypes) if args.dtypes else base["dtypes"],
        causals={"both": [False, True], "yes": [True], "no": [False]}[args.causal],
        passes=_items(args.passes),
        impls=_items(args.impls) if args.impls else default_impls(device),
        tokens=args.tokens or base["tokens"],
        hidden=args.hidden or base["hidden"],
        warmup_ms=base["warmup_ms"] if args.warmup_ms is None else args.warmup_ms,
        rep_ms=args.rep_ms or base["rep_ms"],
    )
    lists = (("dtype", settings.dtypes, DTYPES), ("pass", settings.passes, PASSES), ("impl", settings.impls, IMPLS))
    for kind, names, known in lists:
        unknown = [n for n in names if n not in known]
        if unknown:
            parser.error(f"unknown {kind} {', '.join(unknown)}; known: {', '.join(known)}")
    return args, settings


def timer_label(impl, device: str) -> str:
    if device == "cuda":
        return "CUDA events (triton.testing.do_bench, median)"
    if impl.interpreted(device):
        return "Triton interpreter on CPU (not a speed measure)"
    return "CPU wall clock (median)"


def _gate(reason, verdict, pass_):
    """Why this cell is not timed (an Outcome), or None: unavailable, or failed its check."""
    if reason:
        return Outcome("skipped", reason)
    fwd, grad = verdict
    judged = fwd if pass_ == "fwd" else grad
    return None if judged.status == "ok" else judged


def _describe(outcome: Outcome) -> str:
    if outcome.status != "ok":
        return f"{outcome.status}: {outcome.note}"
    mem = "" if outcome.peak_mem_bytes is None else f"  {outcome.peak_mem_bytes / 2**20:8.0f} MiB"
    return f"{outcome.ms:9.3f} ms{mem}"


def run_config(settings, impls, unavailable, machine, timer, dtype_name, headdim, causal, log) -> list:
    """Records of one (dtype, D, causal): the check at the first seqlen, then every cell."""
    dtype, device = DTYPES[dtype_name], settings.device
    first = settings.seqlens[0]
    shape = check_shape(*fa_shape(first, headdim, settings.tokens, settings.hidden), first, CHECK_BUDGET_BYTES[device])
    ref = make_reference((*shape, headdim), dtype, device, causal, with_grads=any(p != "fwd" for p in settings.passes))
    verdicts = {impl.name: check(impl, ref, causal) for impl in impls if not unavailable[impl.name]}
    del ref
    free_memory()

    records = []
    for seqlen in settings.seqlens:
        batch, heads = fa_shape(seqlen, headdim, settings.tokens, settings.hidden)
        for impl in impls:
            verdict = verdicts.get(impl.name)
            # the Triton interpreter takes seconds a call: one head at the first seqlen shows it runs
            interpreted = impl.interpreted(device) and not unavailable[impl.name]
            shape = (1, 1, seqlen, headdim) if interpreted else (batch, heads, seqlen, headdim)
            for pass_ in settings.passes:
                outcome = _gate(unavailable[impl.name], verdict, pass_)
                if outcome is None and interpreted and seqlen != first:
                    outcome = Outcome("skipped", INTERPRETER_NOTE)
                if outcome is None:
                    outcome = time_cell(impl, pass_, shape, dtype, causal, device, timer)
                judged = verdict and (verdict[0] if pass_ == "fwd" else verdict[1])
                records.append(make_record(
                    machine, pass_, impl=impl.name, dtype=dtype_name, causal=causal, batch=shape[0], heads=shape[1],
                    seqlen=seqlen, headdim=headdim, ms=outcome.ms, peak_mem_bytes=outcome.peak_mem_bytes,
                    status=outcome.status, note=outcome.note, timer=timer_label(impl, device),
                    check_err=judged.check_err if judged else None,
                ))  # fmt: skip
                log(f"{pass_:7} {dtype_name} D={headdim:<3} {'causal' if causal else 'full':6} "
                    f"L={seqlen:<5} b={shape[0]:<3} h={shape[1]:<3} {impl.name:22} {_describe(outcome)}")  # fmt: skip
    return records


def run_benchmark(settings: Settings, impls: list, machine: dict, timer, log=print) -> list:
    """Every record of the run, in (dtype, D, causal, seqlen, impl, pass) order."""
    unavailable = {impl.name: impl.unavailable(settings.device) for impl in impls}
    for name, reason in unavailable.items():
        if reason:
            log(f"skipping {name}: {reason}")
    records = []
    for dtype_name in settings.dtypes:
        for headdim in settings.headdims:
            for causal in settings.causals:
                records += run_config(settings, impls, unavailable, machine, timer, dtype_name, headdim, causal, log)
    return records


def write_results(records: list, out_dir: Path, stem: str) -> list:
    """<stem>.json, <stem>.md and (with matplotlib) <stem>.png under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    write_json(records, paths[0])
    paths[1].write_text(render_markdown(records))
    try:
        write_plot(records, out_dir / f"{stem}.png")
    except ImportError as exc:  # matplotlib: pip install -e ".[bench]"
        print(f"no plot: {exc}")
        return paths
    return paths + [out_dir / f"{stem}.png"]


def strict_failures(records: list) -> list:
    """attn_kernels records that must not happen: wrong results, errors, out of memory."""
    return [r for r in records if r["impl"].startswith("attn_kernels.") and r["status"] in ("wrong", "error", "oom")]


def print_summary(records: list) -> None:
    counts = Counter((r["impl"], r["status"]) for r in records)
    statuses = ["ok", "skipped", "oom", "wrong", "error"]
    print(f"\n{'impl':24}" + "".join(f"{s:>9}" for s in statuses))
    for impl in dict.fromkeys(r["impl"] for r in records):
        print(f"{impl:24}" + "".join(f"{counts[(impl, s)]:9d}" for s in statuses))


def main(argv=None) -> int:
    args, settings = parse_args(argv)
    torch.manual_seed(0)
    machine = machine_info(settings.device)
    if settings.device == "cpu":
        print("No GPU in use: a CPU run of small fp32 shapes, timed by the CPU clock. It shows that the "
              "harness works; its times say nothing about GPU kernels.\n")  # fmt: skip
    else:
        print(f"{machine['gpu']}: torch {machine['torch']}, triton {machine['triton']}, CUDA {machine['cuda']}\n")
    if settings.device == "cuda":
        timer = cuda_timer(settings.warmup_ms, settings.rep_ms)
    else:
        timer = cpu_timer(settings.rep_ms)
    records = run_benchmark(settings, [IMPLS[name] for name in settings.impls], machine, timer)
    stem = args.name or file_stem(machine["gpu"]) + ("-quick" if args.quick else "")
    paths = write_results(records, args.out, stem)
    print_summary(records)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    failures = strict_failures(records)
    for r in failures:
        print(f"FAIL {r['impl']} {r['pass']} {r['dtype']} D={r['headdim']} L={r['seqlen']}: {r['status']}: {r['note']}")
    return 1 if args.strict and failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""A/B benchmark of the Triton kernel variants (attn_kernels/triton/variants.py) next to
SDPA's flash and cuDNN backends, in one process, and the winners for the tile table.

    python bench/ab_variants.py --list                # the variant names, one a line
    python bench/ab_variants.py                       # GPU: every variant x D {64, 128} x
                                                      # seqlen {4096, 16384} x causal x {fwd, bwd}, bf16
    python bench/ab_variants.py --write-table         # and record the winners in
                                                      # attn_kernels/triton/tuned/<gpu>.json

Shapes follow FlashAttention's convention (16k tokens, hidden 2048: batch = 16384 /
seqlen, heads = 2048 / D). Every variant and SDPA backend is checked against the
fp32 reference (bench/measure.py's gate, as bench_attention.py) at each (D, causal)
before it is timed; a wrong one is recorded as "wrong" and never wins. Writes
<out>/<name>.json (records, winners, versions) and <name>.md, and prints the table
last. Needs a CUDA GPU: without one it says so and exits 2 (the CPU test covers
the parsing and the table writing with fake measurements).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from impls import IMPLS, Impl
from measure import CHECK_BUDGET_BYTES, Outcome, check, check_shape, cuda_timer, free_memory, make_reference, time_cell
from records import FA_HIDDEN, FA_TOKENS, fa_shape, file_stem, machine_info, make_record

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from attn_kernels.triton import tuning, variants  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
SDPA = ("sdpa.flash", "sdpa.cudnn")
PASSES = ("fwd", "bwd")
# which tile-table keys a timed pass decides: the backward pass runs the dK/dV and dQ kernels
TABLE_KINDS = {"fwd": ("fwd",), "bwd": ("dkdv", "dq")}
NO_GPU = "ab_variants.py measures GPU kernels: torch sees no CUDA GPU here (run it on the GPU machine)"


@dataclass
class Settings:
    variants: list
    headdims: list
    seqlens: list
    causals: list
    passes: list
    tokens: int
    hidden: int
    warmup_ms: float
    rep_ms: float


def _items(values, convert=str) -> list:
    return [convert(item) for value in values for item in value.split(",") if item]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the variant names and exit")
    parser.add_argument("--variants", nargs="+", help="variants to time (default: all)")
    parser.add_argument("--headdims", nargs="+", default=["64", "128"])
    parser.add_argument("--seqlens", nargs="+", default=["4096", "16384"])
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--passes", nargs="+", default=["fwd,bwd"], help="of fwd, bwd")
    parser.add_argument("--tokens", type=int, default=FA_TOKENS)
    parser.add_argument("--hidden", type=int, default=FA_HIDDEN)
    parser.add_argument("--warmup-ms", type=float, default=10)
    parser.add_argument("--rep-ms", type=float, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", help="file stem (default: <gpu>-ab, e.g. h100-ab)")
    parser.add_argument("--write-table", action="store_true",
                        help="write each key's winning variant into attn_kernels/triton/tuned/<gpu>.json")
    args = parser.parse_args(argv)
    names = _items(args.variants) if args.variants else list(variants.names())
    unknown = [n for n in names if n not in variants.VARIANTS]
    if unknown:
        parser.error(f"unknown variant {', '.join(unknown)}; known: {', '.join(variants.names())}")
    passes = _items(args.passes)
    if any(p not in PASSES for p in passes):
        parser.error(f"passes must be of {', '.join(PASSES)}, got {', '.join(passes)}")
    settings = Settings(
        variants=names, headdims=_items(args.headdims, int), seqlens=sorted(_items(args.seqlens, int)),
        causals={"both": [False, True], "yes": [True], "no": [False]}[args.causal], passes=passes,
        tokens=args.tokens, hidden=args.hidden, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
    )
    return args, settings


@contextlib.contextmanager
def forced_variant(name: str):
    """Every Triton launch inside runs variant `name` (the environment variable)."""
    saved = os.environ.get(variants.ENV)
    os.environ[variants.ENV] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(variants.ENV, None)
        else:
            os.environ[variants.ENV] = saved


def variant_impl(name: str) -> Impl:
    """attn_kernels' Triton backend under the record name of variant `name`; the variant
    is forced around its whole check and timing (`in_context`), so that the backward
    kernels, launched by autograd after the forward returned, run it too."""
    base = IMPLS["attn_kernels.triton"]
    return Impl(f"triton[{name}]", base.prepare, base.unavailable, base.refusals, base.interpreted)


def in_context(impl: Impl):
    name = impl_variant(impl.name)
    return forced_variant(name) if name else contextlib.nullcontext()


def impl_variant(impl_name: str):
    """'triton[interior]' -> 'interior'; None for other impls."""
    if impl_name.startswith("triton[") and impl_name.endswith("]"):
        return impl_name[len("triton["):-1]
    return None


def run_benchmark(settings: Settings, machine: dict, timer, log=print, checkpoint=None) -> list:
    """Every record, in (D, causal, seqlen, impl, pass) order; checkpoint(records) after
    each (D, causal), so that a run cut short still leaves its results."""
    impls = [variant_impl(n) for n in settings.variants] + [IMPLS[n] for n in SDPA]
    unavailable = {impl.name: impl.unavailable("cuda") for impl in impls}
    records = []
    for headdim in settings.headdims:
        for causal in settings.causals:
            first = settings.seqlens[0]
            shape = check_shape(*fa_shape(first, headdim, settings.tokens, settings.hidden), first,
                                CHECK_BUDGET_BYTES["cuda"])
            ref = make_reference((*shape, headdim), torch.bfloat16, "cuda", causal, with_grads="bwd" in settings.passes)
            verdicts = {}
            for impl in impls:
                if not unavailable[impl.name]:
                    with in_context(impl):
                        verdicts[impl.name] = check(impl, ref, causal)
            del ref
            free_memory()
            for seqlen in settings.seqlens:
                batch, heads = fa_shape(seqlen, headdim, settings.tokens, settings.hidden)
                for impl in impls:
                    verdict = verdicts.get(impl.name)
                    for pass_ in settings.passes:
                        judged = verdict and (verdict[0] if pass_ == "fwd" else verdict[1])
                        if unavailable[impl.name]:
                            outcome = Outcome("skipped", unavailable[impl.name])
                        elif judged is None or judged.status != "ok":
                            outcome = judged or Outcome("skipped", "no check")
                        else:
                            with in_context(impl):
                                outcome = time_cell(impl, pass_, (batch, heads, seqlen, headdim), torch.bfloat16,
                                                    causal, "cuda", timer)
                        ran = ""
                        if impl_variant(impl.name) and outcome.status == "ok":
                            ran = "; ".join(f"{k}: {c.name}" for k, c in sorted(variants.last_choices().items()))
                        records.append(make_record(
                            machine, pass_, impl=impl.name, dtype="bf16", causal=causal, batch=batch, heads=heads,
                            seqlen=seqlen, headdim=headdim, ms=outcome.ms, peak_mem_bytes=outcome.peak_mem_bytes,
                            status=outcome.status, note=outcome.note or (f"ran {ran}" if ran else ""),
                            timer="CUDA events (triton.testing.do_bench, median)",
                            check_err=judged.check_err if judged else None))
                        ms = f"{outcome.ms:8.3f} ms" if outcome.ms is not None else f"{outcome.status}: {outcome.note}"
                        log(f"{pass_:4} D={headdim:<3} {'causal' if causal else 'full':6} L={seqlen:<5} "
                            f"{impl.name:20} {ms}")
            if checkpoint is not None:
                checkpoint(records)
    return records


def winners(records: list) -> dict:
    """{(pass, headdim, causal): (variant, total ms over the seqlens)}: the variant with the
    least total time over every seqlen, among variants with every cell ok."""
    totals: dict = {}
    broken: set = set()
    for r in records:
        name = impl_variant(r["impl"])
        if name is None:
            continue
        cell = (r["pass"], r["headdim"], r["causal"])
        if r["status"] != "ok":
            broken.add((cell, name))
            continue
        totals.setdefault(cell, {}).setdefault(name, 0.0)
        totals[cell][name] += r["ms"]
    found = {}
    for cell, by_name in totals.items():
        ok = {n: ms for n, ms in by_name.items() if (cell, n) not in broken}
        if ok:
            best = min(ok, key=ok.get)
            found[cell] = (best, ok[best])
    return found


def write_table(path: Path, found: dict, header: dict, baseline_ms: dict) -> list:
    """Record each winner in the tile table at `path` (merged into what is there): per
    key the variant, its total ms and the baseline's. An entry the table lacks gets the
    first-guess tiles, since a table entry must name tiles (tuning.read_configs).
    -> the key names written."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = dict(header, configs={})
    data.update({k: v for k, v in header.items() if k != "configs"})
    configs = data.setdefault("configs", {})
    written = []
    for (pass_, headdim, causal), (name, ms) in sorted(found.items(), key=str):
        for kind in TABLE_KINDS[pass_]:
            key = tuning.Key.of(kind, torch.bfloat16, headdim, causal)
            entry = configs.get(key.name())
            if entry is None:
                blocks = tuning.default(key)
                entry = dict(BLOCK_M=blocks.BLOCK_M, BLOCK_N=blocks.BLOCK_N, num_warps=blocks.num_warps,
                             num_stages=blocks.num_stages)
            entry.update(variant=name, variant_ms=round(ms, 5),
                         baseline_ms=None if baseline_ms.get((pass_, headdim, causal)) is None
                         else round(baseline_ms[(pass_, headdim, causal)], 5))
            configs[key.name()] = entry
            written.append(key.name())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    tuning.forget(path)  # this process reads the new table, not what it cached of the old one
    return written


def baseline_totals(records: list) -> dict:
    totals: dict = {}
    for r in records:
        if impl_variant(r["impl"]) == "baseline" and r["status"] == "ok":
            cell = (r["pass"], r["headdim"], r["causal"])
            totals[cell] = totals.get(cell, 0.0) + r["ms"]
    return totals


def render_table(records: list) -> str:
    """Markdown: one row per (pass, D, causal, seqlen), TFLOP/s per impl, and the best
    variant's speed-up over the best SDPA backend."""
    impls = list(dict.fromkeys(r["impl"] for r in records))
    rows: dict = {}
    for r in records:
        rows.setdefault((r["pass"], r["headdim"], r["causal"], r["seqlen"]), {})[r["impl"]] = r
    lines = ["| pass | D | causal | seqlen | " + " | ".join(impls) + " | best variant / best SDPA |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in impls) + " | --- |"]
    for (pass_, d, causal, seqlen), by_impl in rows.items():
        cells, best_v, best_s = [], None, None
        for name in impls:
            r = by_impl.get(name)
            value = r and r.get("tflops")
            cells.append(f"{value:.0f}" if value else (r["status"] if r else ""))
            if value:
                if impl_variant(name):
                    best_v = max(best_v or 0.0, value)
                else:
                    best_s = max(best_s or 0.0, value)
        ratio = f"{best_v / best_s:.2f}x" if best_v and best_s else "n/a"
        lines.append(f"| {pass_} | {d} | {'yes' if causal else 'no'} | {seqlen} | " + " | ".join(cells)
                     + f" | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args, settings = parse_args(argv)
    if args.list:
        for name in variants.names():
            print(f"{name:12} {variants.VARIANTS[name]}")
        return 0
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1":
        print(NO_GPU + (" (TRITON_INTERPRET=1 is set)" if torch.cuda.is_available() else ""), file=sys.stderr)
        return 2
    torch.manual_seed(0)
    machine = machine_info("cuda")
    print(f"{machine['gpu']}: torch {machine['torch']}, triton {machine['triton']}, CUDA {machine['cuda']}\n")
    stem = args.name or file_stem(machine["gpu"]) + "-ab"
    args.out.mkdir(parents=True, exist_ok=True)

    def save(records, table_file=None):
        found = winners(records)
        summary = {f"{p}/d{d}/{'causal' if c else 'full'}": dict(variant=n, total_ms=ms) for (p, d, c), (n, ms) in
                   found.items()}
        (args.out / f"{stem}.md").write_text(f"# {machine['gpu']}: Triton variants A/B ({machine['date']})\n\n"
                                             f"TFLOP/s (bf16, {settings.tokens} tokens, hidden {settings.hidden}; "
                                             f"CUDA events, median)\n\n{render_table(records)}")
        (args.out / f"{stem}.json").write_text(json.dumps(
            dict(machine=machine, settings=vars(settings), winners=summary, table=table_file, records=records),
            indent=1, default=str) + "\n")
        return found

    records = run_benchmark(settings, machine, cuda_timer(settings.warmup_ms, settings.rep_ms), checkpoint=save)
    found = save(records)
    table = render_table(records)
    table_file = None
    if args.write_table:
        gpu = tuning.gpu_name(torch.device("cuda"))
        header = dict(gpu=machine["gpu"], date=machine["date"], **tuning.versions())
        keys = write_table(tuning.table_path(gpu), found, header, baseline_totals(records))
        print(f"wrote {len(keys)} winners into {tuning.table_path(gpu)}")
        # the JSON carries the table too: a remote run hands back only its results folder
        table_file = dict(path=str(tuning.table_path(gpu).relative_to(ROOT)),
                          content=json.loads(tuning.table_path(gpu).read_text()))
        save(records, table_file)
    print(f"wrote {args.out / (stem + '.json')}, {args.out / (stem + '.md')}\n")
    for cell, (name, ms) in sorted(found.items(), key=str):
        print(f"winner {cell[0]} D={cell[1]} {'causal' if cell[2] else 'full'}: {name} ({ms:.3f} ms total)")
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

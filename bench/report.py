"""The Markdown report of benchmark records: TFLOP/s and peak-memory tables by seqlen."""

from __future__ import annotations

from collections import defaultdict

from records import PASSES

GROUP_KEYS = ("pass", "dtype", "headdim", "causal")
SHORT_STATUS = {"skipped": "skip", "oom": "oom", "wrong": "wrong", "error": "error"}
INTERPRETED = "†"


def _unique(records, key):
    return list(dict.fromkeys(r[key] for r in records))


def _group_title(pass_, dtype, headdim, causal) -> str:
    return f"{pass_}, {dtype}, D={headdim}, {'causal' if causal else 'non-causal'}"


def _groups(records):
    """{(pass, dtype, headdim, causal): records}, passes in fwd, bwd, fwd_bwd order."""
    groups = defaultdict(list)
    for r in records:
        groups[tuple(r[k] for k in GROUP_KEYS)].append(r)
    return dict(sorted(groups.items(), key=lambda kv: (PASSES.index(kv[0][0]),) + kv[0][1:]))


def _cell(record, value) -> str:
    if record["status"] != "ok":
        return SHORT_STATUS.get(record["status"], record["status"])
    return value(record)


def _table(records, value) -> list:
    seqlens = sorted(_unique(records, "seqlen"))
    lines = ["| impl | " + " | ".join(str(s) for s in seqlens) + " |", "|---" * (len(seqlens) + 1) + "|"]
    for impl in _unique(records, "impl"):
        by_seqlen = {r["seqlen"]: r for r in records if r["impl"] == impl}
        mark = INTERPRETED if any("interpreter" in (r["timer"] or "") for r in by_seqlen.values()) else ""
        cells = [_cell(by_seqlen[s], value) if s in by_seqlen else "" for s in seqlens]
        lines.append(f"| {impl}{mark} | " + " | ".join(cells) + " |")
    return lines


def _tflops(record) -> str:
    return f"{record['tflops']:.1f}" if record["tflops"] >= 10 else f"{record['tflops']:.3g}"


def _mib(record) -> str:
    peak = record["peak_mem_bytes"]
    return "n/a" if peak is None else f"{peak / 2**20:.0f}"


def _header(records) -> list:
    first = records[0]
    timers = ", ".join(t for t in _unique(records, "timer") if t) or "unknown"
    tokens = max(r["batch"] * r["seqlen"] for r in records)
    hidden = max(r["heads"] * r["headdim"] for r in records)
    measured_memory = any(r["peak_mem_bytes"] is not None for r in records)
    lines = [
        f"# Attention benchmark: {first['gpu']}",
        "",
        f"torch {first['torch']}, triton {first['triton']}, CUDA {first['cuda']}, run {first['date']} (UTC).",
        f"Timer: {timers}.",
        "",
        f"Shapes: batch = {tokens} / seqlen, heads = {hidden} / D (about {tokens} tokens, hidden {hidden}).",
        "FLOPs: 4 * batch * heads * seqlen^2 * D per forward, halved for causal; bwd = 2.5x fwd, fwd_bwd = 3.5x.",
        "Cells: TFLOP/s" + (" (peak memory in MiB below)" if measured_memory else "")
        + "; oom = out of memory; wrong = failed the check against the fp32 reference, not timed;",
        "skip / error = did not run (reasons at the end).",
    ]
    if first["gpu"] == "cpu":
        lines += ["", "**CPU run: no GPU here. These times say nothing about GPU kernels.**"]
    if any("interpreter" in (r["timer"] or "") for r in records):
        lines += ["", f"{INTERPRETED} ran in the Triton interpreter: a check that it runs, not a speed."]
    return lines


def _reasons(records) -> list:
    seen = dict.fromkeys((r["impl"], r["status"], r["note"]) for r in records if r["status"] != "ok")
    if not seen:
        return []
    return ["", "## Not timed", ""] + [f"- {impl}: {status}: {note}" for impl, status, note in seen]


def render_markdown(records: list) -> str:
    if not records:
        return "# Attention benchmark\n\nNo records.\n"
    lines = _header(records)
    groups = _groups(records)
    for title, value in (("TFLOP/s", _tflops), ("Peak memory (MiB)", _mib)):
        if value is _mib and not any(r["peak_mem_bytes"] is not None for r in records):
            continue  # a CPU run measures no memory
        for key, group in groups.items():
            lines += ["", f"## {title}: {_group_title(*key)}", ""] + _table(group, value)
    lines += _reasons(records)
    return "\n".join(lines) + "\n"

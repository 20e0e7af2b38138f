"""The benchmark figure: TFLOP/s vs seqlen per implementation, one panel per
pass x (D, causal), and a last row of peak memory vs seqlen (fwd_bwd, or the last
pass run). One dtype is drawn (bf16 when present); the Markdown has them all."""

from __future__ import annotations

from pathlib import Path

from records import PASSES


def _panel_keys(records):
    return sorted({(r["headdim"], r["causal"]) for r in records})


def _lines(ax, records, value, ylabel, colors):
    for impl, color in colors.items():
        points = sorted((r["seqlen"], value(r)) for r in records if r["impl"] == impl and r["status"] == "ok")
        points = [(s, y) for s, y in points if y is not None]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, color=color, label=impl)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("seqlen")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def write_plot(records: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in records}, key=lambda d: (d != "bf16", d))
    dtype = dtypes[0]
    records = [r for r in records if r["dtype"] == dtype]
    passes = [p for p in PASSES if any(r["pass"] == p for r in records)]
    panels = _panel_keys(records)
    impls = list(dict.fromkeys(r["impl"] for r in records))
    palette = plt.get_cmap("tab10")
    colors = {impl: palette(i % 10) for i, impl in enumerate(impls)}
    memory_pass = "fwd_bwd" if "fwd_bwd" in passes else passes[-1]
    with_memory = any(r["peak_mem_bytes"] is not None for r in records)
    rows = passes + ([f"peak memory, {memory_pass}"] if with_memory else [])

    fig, axes = plt.subplots(len(rows), len(panels), figsize=(4 * len(panels), 3 * len(rows)), squeeze=False)
    for col, (headdim, causal) in enumerate(panels):
        in_panel = [r for r in records if r["headdim"] == headdim and r["causal"] == causal]
        label = f"D={headdim}, {'causal' if causal else 'non-causal'}"
        for row, pass_ in enumerate(passes):
            ax = axes[row][col]
            _lines(ax, [r for r in in_panel if r["pass"] == pass_], lambda r: r["tflops"], "TFLOP/s", colors)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{pass_}, {label}", fontsize=9)
        if with_memory:
            ax = axes[-1][col]
            mib = lambda r: None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20  # noqa: E731
            _lines(ax, [r for r in in_panel if r["pass"] == memory_pass], mib, "peak MiB", colors)
            ax.set_yscale("log")
            ax.set_title(f"peak memory, {memory_pass}, {label}", fontsize=9)

    first = records[0]
    where = "CPU (no GPU: not kernel timings)" if first["gpu"] == "cpu" else first["gpu"]
    fig.suptitle(f"{where}, {dtype}: torch {first['torch']}, triton {first['triton']}, {first['date'][:10]}")
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines()}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 8) or 1, fontsize=9)
    # fixed margins: tight_layout costs seconds on a large grid
    height = fig.get_figheight()  # inches: room for the title above and the legend below
    fig.subplots_adjust(left=0.06, right=0.98, bottom=1.1 / height, top=1 - 0.7 / height, wspace=0.3, hspace=0.45)
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Attention heatmaps: `plot_attention(weights, row_labels, col_labels, path)`.

matplotlib is imported inside the functions (Agg backend, no display needed), so
`import attn_kernels` never pulls it in: `pip install matplotlib` when you plot.
Labels in Chinese, Japanese or Korean need a font with those glyphs; the first one
found on the machine is used (e.g. `apt-get install fonts-noto-cjk`), and without
one the plot is still written, with a warning, and the glyphs show as boxes.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Optional, Sequence

# tried first, in this order; any other installed font that has the glyphs also works
_CJK_FAMILIES = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Source Han Sans SC",
    "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei",
    "Droid Sans Fallback",
    "Microsoft YaHei",
    "SimHei",
    "PingFang SC",
    "Arial Unicode MS",
)


def _as_matrix(weights):
    import numpy as np

    if hasattr(weights, "detach"):  # a torch tensor, on any device, with or without grad
        weights = weights.detach().float().cpu().numpy()
    matrix = np.asarray(weights, dtype=float)
    if matrix.ndim != 2:
        raise ValueError(f"weights must be 2-D (L queries, S keys), got shape {matrix.shape}")
    if 0 in matrix.shape:
        raise ValueError(f"weights must not be empty, got shape {matrix.shape}")
    return matrix


def _font_covers(path: str, codepoints: frozenset) -> bool:
    from matplotlib.ft2font import FT2Font

    try:
        return codepoints <= FT2Font(path).get_charmap().keys()
    except (OSError, RuntimeError, ValueError):  # unreadable or unsupported font file
        return False


@functools.lru_cache(maxsize=None)
def _family_for(codepoints: frozenset) -> Optional[str]:
    """The name of an installed font family with every glyph in `codepoints`, or None."""
    from matplotlib import font_manager

    manager = font_manager.fontManager
    known = {entry.fname for entry in manager.ttflist}
    # fonts installed after matplotlib built its font cache are not in it yet
    for path in font_manager.findSystemFonts():
        if path not in known:
            try:
                manager.addfont(path)
            except (OSError, RuntimeError, ValueError):
                pass
    entries = sorted(
        manager.ttflist,
        key=lambda e: _CJK_FAMILIES.index(e.name) if e.name in _CJK_FAMILIES else len(_CJK_FAMILIES),
    )
    for entry in entries:
        if _font_covers(entry.fname, codepoints):
            return entry.name
    return None


def _font_families(labels: Sequence[str]) -> list:
    """Font family list for rcParams: a font that has the labels' non-ASCII glyphs, first."""
    special = frozenset(ord(ch) for label in labels for ch in label if ord(ch) > 0x24F)
    if not special:
        return ["DejaVu Sans"]
    family = _family_for(special)
    if family is None:
        warnings.warn(
            "attn_kernels.viz: no installed font has the glyphs of these labels (e.g. CJK); they will "
            "show as boxes. Install one, e.g. `apt-get install fonts-noto-cjk`.",
            stacklevel=3,
        )
        return ["DejaVu Sans"]
    return [family, "DejaVu Sans"]


def default_figsize(rows: int, cols: int) -> tuple:
    """Figure size in inches for an L x S heatmap: about 0.9 x 0.6 inch a cell, within limits."""
    return (min(16.0, 2.2 + 0.9 * cols), min(12.0, 1.6 + 0.6 * rows))


def plot_attention(
    weights,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path,
    title: Optional[str] = None,
    *,
    fmt: str = ".2f",
    figsize: Optional[tuple] = None,
    dpi: int = 150,
) -> Path:
    """Writes attention weights as an annotated heatmap PNG; returns the path.

    Args:
        weights: (L, S) tensor or array: row i is query i's weights over the S keys.
        row_labels: L query labels (y axis). col_labels: S key labels (x axis).
        path: where the PNG goes (parent folders are created).
        title: optional figure title.
        fmt: format of the value written in each cell.
        figsize: inches (width, height); default `default_figsize(L, S)`. The PNG is
            figsize * dpi pixels.
    """
    matrix = _as_matrix(weights)
    rows, cols = matrix.shape
    row_labels, col_labels = [str(x) for x in row_labels], [str(x) for x in col_labels]
    if len(row_labels) != rows:
        raise ValueError(f"row_labels has {len(row_labels)} labels for {rows} rows of weights {matrix.shape}")
    if len(col_labels) != cols:
        raise ValueError(f"col_labels has {len(col_labels)} labels for {cols} columns of weights {matrix.shape}")

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    families = _font_families(row_labels + col_labels + [title or ""])
    with matplotlib.rc_context({"font.family": families}):
        # a bare Figure on an Agg canvas: no pyplot state, no display, the caller's backend untouched
        fig = Figure(figsize=figsize or default_figsize(rows, cols), dpi=dpi, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        top = matrix.max() if matrix.max() > 0 else 1.0
        image = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=top, aspect="auto")
        ax.set_xticks(range(cols), labels=col_labels)
        ax.set_yticks(range(rows), labels=row_labels)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        for i in range(rows):
            for j in range(cols):
                # white text on the dark cells, black on the light ones
                color = "white" if matrix[i, j] > 0.6 * top else "black"
                ax.text(j, i, format(matrix[i, j], fmt), ha="center", va="center", color=color)
        fig.colorbar(image, ax=ax, label="attention weight")
        if title:
            ax.set_title(title)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, format="png")
    return path

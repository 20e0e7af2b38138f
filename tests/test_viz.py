"""attn_kernels.viz.plot_attention: the PNG it writes, and the errors it raises."""

import struct
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("matplotlib")

from attn_kernels import attention_weights  # noqa: E402
from attn_kernels import viz  # noqa: E402


def png_size(path) -> tuple:
    """(width, height) from the PNG's IHDR chunk."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", header[16:24])


def test_writes_png_of_the_requested_size(tmp_path):
    weights = torch.softmax(torch.randn(3, 5), dim=-1)
    path = viz.plot_attention(weights, list("abc"), list("vwxyz"), tmp_path / "out" / "a.png", figsize=(4, 3), dpi=100)
    assert path == tmp_path / "out" / "a.png"
    assert png_size(path) == (400, 300)


def test_default_size_follows_the_matrix(tmp_path):
    path = viz.plot_attention([[0.25, 0.75], [0.5, 0.5]], ["q0", "q1"], ["k0", "k1"], tmp_path / "b.png", dpi=50)
    width, height = viz.default_figsize(2, 2)
    assert png_size(path) == (round(width * 50), round(height * 50))


def test_cjk_labels_and_grad_tensors(tmp_path):
    # the tutorial's example; a tensor that needs grad is plotted as it is
    q = torch.tensor([[1.0, 0.8]], requires_grad=True)
    k = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.9]])
    weights = attention_weights(q, k)
    path = viz.plot_attention(weights, ["喜欢"], ["猫", "追逐", "老鼠"], tmp_path / "c.png", title="注意力")
    assert png_size(path)[0] > 0


def test_missing_cjk_font_warns_and_still_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(viz, "_family_for", lambda codepoints: None)
    with pytest.warns(UserWarning, match="font"):
        path = viz.plot_attention([[1.0]], ["喜欢"], ["猫"], tmp_path / "d.png")
    assert path.exists()


def test_ascii_labels_need_no_font_search(tmp_path, monkeypatch):
    monkeypatch.setattr(viz, "_family_for", lambda codepoints: pytest.fail("searched for a font"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        viz.plot_attention([[0.5, 0.5]], ["q"], ["a", "b"], tmp_path / "e.png")


@pytest.mark.parametrize(
    "weights, rows, cols, message",
    [
        (torch.ones(3), ["a"], ["x", "y", "z"], "2-D"),
        (torch.ones(1, 2, 3), ["a"], ["x"], "2-D"),
        (torch.ones(0, 3), [], ["x", "y", "z"], "empty"),
        (torch.ones(2, 3), ["a"], ["x", "y", "z"], "row_labels has 1 labels for 2 rows"),
        (torch.ones(2, 3), ["a", "b"], ["x", "y"], "col_labels has 2 labels for 3 columns"),
    ],
)
def test_shape_and_label_mismatch_raise(tmp_path, weights, rows, cols, message):
    with pytest.raises(ValueError, match=message):
        viz.plot_attention(weights, rows, cols, tmp_path / "f.png")
    assert not (tmp_path / "f.png").exists()


def test_importing_the_package_does_not_import_matplotlib():
    code = "import sys, attn_kernels, attn_kernels.viz; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

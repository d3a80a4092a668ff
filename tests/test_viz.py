import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from fgvc.viz import (
    overlay_heatmap,
    save_attribution_grid,
    save_bar_chart,
    save_confusion_matrix,
    save_histogram,
    save_neighbor_grid,
    save_variant_grid,
)


def _png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size  # (width, height)


@pytest.fixture(autouse=True)
def no_open_figures():
    yield
    assert plt.get_fignums() == []


def test_overlay_heatmap_blends():
    image = torch.rand(3, 20, 30)
    heat = torch.rand(20, 30)
    out = overlay_heatmap(image, heat)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    plain = overlay_heatmap(image, heat, alpha=0.0)
    assert np.abs(plain.astype(int) - np.round(image.permute(1, 2, 0).numpy() * 255)).max() <= 1
    hot = overlay_heatmap(torch.zeros(3, 2, 2), torch.ones(2, 2), alpha=1.0)
    assert hot[0, 0, 0] > 100 and hot[0, 0, 2] < 50  # top of "jet" is dark red
    uint8 = overlay_heatmap((image * 255).to(torch.uint8), heat)
    assert np.abs(uint8.astype(int) - out.astype(int)).max() <= 2
    with pytest.raises(ValueError):
        overlay_heatmap(image, torch.rand(10, 10))


def test_attribution_grid(tmp_path):
    path = save_attribution_grid(
        tmp_path / "grid.png", torch.rand(3, 3, 32, 32), torch.rand(3, 32, 32), ["a", "b", "c"]
    )
    width, height = _png_size(path)
    assert path.exists() and width == 2 * 150 + 90 and height >= 3 * 150
    untitled = save_attribution_grid(
        tmp_path / "sub" / "g.png", torch.rand(1, 3, 16, 16), torch.rand(1, 16, 16)
    )
    assert _png_size(untitled)[0] == 390 and _png_size(untitled)[1] >= 150
    two_lines = save_attribution_grid(tmp_path / "t.png", torch.rand(2, 3, 32, 32), torch.rand(2, 32, 32),
                                      ["WRONG  true: a / predicted: b\nbackground preference 1.20", "true: a"],
                                      wrong=[True, False], colorbar_label="occlusion (scaled)")
    assert _png_size(two_lines)[1] > _png_size(tmp_path / "sub" / "g.png")[1] * 2  # room for two-line titles


def test_neighbor_grid(tmp_path):
    indices = torch.tensor([[0, 2, 1], [3, -1, 0]])
    path = save_neighbor_grid(
        tmp_path / "nn.png",
        torch.rand(2, 3, 32, 24),
        (torch.rand(4, 3, 32, 24) * 255).to(torch.uint8),
        indices,
        query_labels=torch.tensor([0, 1]),
        ref_labels=torch.tensor([0, 1, 0, 1]),
        label_names=["Dior", "Prada"],
        scores=torch.tensor([[0.9, 0.8, 0.7], [0.6, float("-inf"), 0.5]]),
    )
    assert _png_size(path) == (4 * 150, 2 * 150 + 60)  # + the legend of the frame colours


def test_histogram_and_bar_chart(tmp_path):
    hist = save_histogram(tmp_path / "h.png", torch.rand(100), "bg energy", "fraction")
    assert _png_size(hist) == (400, 300)
    names = ["original", "only_fg", "no_fg", "mixed_same", "mixed_rand"]
    bars = save_bar_chart(tmp_path / "b.png", names, [0.9, 0.8, 0.3, 0.85, 0.5], "acc", chance=0.02)
    assert _png_size(bars) == (400, 300)
    wide = save_bar_chart(tmp_path / "w.png", [str(i) for i in range(12)], np.arange(12) / 12, "x")
    assert _png_size(wide) == (750, 300)  # 0.5 in per bar + 1.5 in


def test_variant_grid(tmp_path):
    variants = {name: torch.rand(4, 3, 24, 24) for name in ("original", "only_fg", "no_fg")}
    variants["partner_same"] = torch.arange(4)
    path = save_variant_grid(tmp_path / "v.png", variants, n=2)
    assert _png_size(path) == (3 * 150, 2 * 150)


def test_labels_are_text_never_mathtext(tmp_path):
    """A designer named like a formula must not be parsed (it used to kill a training run)."""
    from fgvc.viz.training_plots import save_confusion, save_per_class

    names = ["Cost $5%$", "a$^$b", "plain"]
    save_confusion(tmp_path / "c.png", torch.tensor([[2, 1, 0], [0, 3, 0], [1, 0, 2]]), names, "$x^$")
    save_per_class(tmp_path / "p.png", [0.5, 1.0, 0.2], names, [3, 3, 3], "per class $")
    save_bar_chart(tmp_path / "b.png", names, [0.1, 0.2, 0.3], "acc $", chance=0.33)
    save_attribution_grid(tmp_path / "g.png", torch.rand(1, 3, 16, 16), torch.rand(1, 16, 16), ["true: a$^$b"])
    for name in ("c.png", "p.png", "b.png", "g.png"):
        assert _png_size(tmp_path / name)[0] > 0


def test_confusion_matrix_with_other_axes_and_row_counts(tmp_path):
    """The No-FG confusion of the swap test: rows are the backdrop's designer, each stating its
    count; the training figure is the same plot with its default labels, unchanged."""
    from fgvc.viz.training_plots import save_confusion

    counts = torch.tensor([[4, 1, 0], [0, 3, 2], [1, 0, 0]])
    names = ["Dior", "Prada", "Bottega Veneta"]
    path = save_confusion_matrix(tmp_path / "no_fg.png", counts, names, "No-FG confusion\n(25 images)",
                                 row_label="backdrop's designer", column_label="predicted on No-FG",
                                 share_label="share of the backdrop's images", row_counts=True)
    assert _png_size(path) == (475, 403)  # 4.75 x 4.04 in for 3 classes, as the training figure
    training = save_confusion(tmp_path / "training.png", counts, names, "Confusion matrix (val)")
    generic = save_confusion_matrix(tmp_path / "generic.png", counts, names, "Confusion matrix (val)")
    assert np.array_equal(np.asarray(Image.open(training)), np.asarray(Image.open(generic)))
    assert not np.array_equal(np.asarray(Image.open(training)), np.asarray(Image.open(path)))
    many = save_confusion_matrix(tmp_path / "many.png", torch.eye(70, dtype=torch.long), [str(i) for i in range(70)],
                                 "70 classes", row_counts=True)  # names hidden beyond 60
    assert _png_size(many) == (1600, 1360)

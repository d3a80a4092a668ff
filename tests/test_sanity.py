"""The maps' sanity check (model-parameter randomisation, Adebayo et al. 2018): the curve of a
map that explains the model falls as the network is randomised from the head down; a map of
the image alone (its edges) stays at 1 and is flagged."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fgvc.analysis.config import AnalyzeConfig
from fgvc.analysis.data import load_analysis_data
from fgvc.analysis.gradcam import GradCAM
from fgvc.analysis.methods import METHODS
from fgvc.analysis.methods.attribution import cam_layer
from fgvc.analysis.sanity import FLAG_THRESHOLD, FULL, cascade, cascading_randomisation, edge_map, randomise_, spearman
from fgvc.data.dataset import ShardDataset
from fgvc.models.factory import create_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tiny_root):
    """fn-small fitted to the tiny demo's 24 training images (full-batch Adam, 60 steps)."""
    torch.manual_seed(0)
    train = ShardDataset(tiny_root, "train")
    items = train.gather(torch.arange(len(train)))
    images, labels = items["images"].float() / 255.0, items["labels"]
    model = create_model("fn-small", train.num_classes, pretrained=False)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        assert (model(images).argmax(1) == labels).float().mean() >= 0.9  # it learned its training set
    return model


def gradcam_maps(model, images, targets):
    _, layer, _ = cam_layer(model, tuple(images.shape[2:]), None)
    return GradCAM(model, target_layer=layer).attribute(images, targets).maps


def test_spearman_of_maps():
    a = torch.arange(12.0).view(1, 3, 4)
    assert spearman(a, a).item() == pytest.approx(1.0)
    assert spearman(a, -a).item() == pytest.approx(-1.0)
    assert spearman(a, a ** 3).item() == pytest.approx(1.0)  # ranks only
    assert spearman(a, torch.zeros_like(a)).item() == 0.0  # a constant randomised map ranks nothing
    assert math.isnan(spearman(torch.zeros_like(a), a).item())  # nothing to compare
    ties = torch.tensor([[[0.0, 0.0, 1.0, 2.0]]])
    assert spearman(ties, torch.tensor([[[0.0, 0.0, 1.0, 2.0]]])).item() == pytest.approx(1.0)


def test_the_cascade_runs_from_the_head_down_and_ends_with_no_trained_weight(trained):
    steps = cascade(trained)
    assert [name for name, _ in steps][:2] == ["head", "body.stage3"]
    assert steps[-1][0] == f"body.stem {FULL}"
    randomised = copy.deepcopy(trained)
    for k, (_, modules) in enumerate(cascade(randomised), start=1):
        randomise_(modules, k)
    trained_weights = dict(trained.named_parameters())
    assert all(not torch.equal(p, trained_weights[k]) for k, p in randomised.named_parameters())
    images = torch.rand(2, 3, 32, 24)
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    curves = cascading_randomisation(trained, images, torch.tensor([0, 1]),
                                     {"edges": lambda m, x, t: edge_map(x)})
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in before.items())  # the model is untouched
    assert curves["edges"].steps == ["none", *(f"+ {name}" for name, _ in steps)]


def test_gradcam_falls_with_randomisation_and_an_edge_map_is_flagged(trained, tiny_root):
    data = load_analysis_data(tiny_root, "val", 12, 0)
    images = data.images.float() / 255.0
    with torch.no_grad():
        targets = trained(images).argmax(1)
    curves = cascading_randomisation(trained, images, targets, {"gradcam": gradcam_maps,
                                                                "edges": lambda m, x, t: edge_map(x)})
    gradcam, edges = curves["gradcam"], curves["edges"]
    assert gradcam.intervals[0].estimate == 1.0
    # threshold: mean Spearman correlation after full randomisation below FLAG_THRESHOLD (0.5)
    assert gradcam.after_full_randomisation.estimate < FLAG_THRESHOLD, gradcam.intervals
    assert gradcam.after_full_randomisation.estimate < gradcam.intervals[1].estimate + 0.2
    assert not gradcam.flagged
    assert edges.flagged and edges.after_full_randomisation.estimate == pytest.approx(1.0)


def test_analyze_method_sanity_reports_every_attribution_method(trained, tiny_root, tmp_path):
    data = load_analysis_data(tiny_root, "val", 6, 0)
    method = METHODS.get("sanity")
    result = method.run(trained, data, AnalyzeConfig(method=("sanity",), window=8, stride=8))
    for name in ("gradcam", "occlusion"):
        assert result.metrics[f"{name}_corr_00"] == 1.0
        assert result.metrics[f"{name}_flagged"] in (0.0, 1.0)
        low, value, high = (result.metrics[f"{name}_full_randomisation{s}"] for s in ("_low", "", "_high"))
        assert low <= value <= high
        assert f"{name}_sanity" in method.columns
    method.write_artifacts(result, data, tmp_path)
    assert (tmp_path / "sanity_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "<svg" in (tmp_path / "sanity_curve.svg").read_text()
    assert "gradcam_corr_00" in (tmp_path / "per_image.csv").read_text().splitlines()[0]

"""Attribution methods: Grad-CAM and occlusion, and what they measure about the background.

Each image gets a map ``[H, W]``; with person masks, two numbers per image say where the map's
mass lies:

- ``bg_preference`` (the headline): the share of positive attribution on the background divided
  by the background's share of the image area. 1.0 = no preference (a uniform map), above 1 =
  attribution concentrated on the background, below 1 = on the person. Bounded below by 0 and
  comparable across models whose people cover different areas.
- ``bg_energy_fraction``: the raw share of positive attribution on the background (1 minus the
  energy-based pointing game of Score-CAM). Its no-preference value is the background's area
  share (about 0.8 on the demo data), so alone it reads as "mostly background" for every model.

Means come with a bootstrap 95% interval over images. Deletion/insertion AUCs (RISE) say
whether the map ranks pixels the way the model uses them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fgvc.analysis.config import MIN_CAM_CELLS, AnalyzeConfig
from fgvc.analysis.data import AnalysisData
from fgvc.analysis.gradcam import GradCAM
from fgvc.analysis.methods.base import AnalysisMethod, Column, MethodResult, register
from fgvc.analysis.metrics import bg_energy_fraction, bg_preference, deletion_insertion_auc
from fgvc.analysis.occlusion import Occlusion
from fgvc.analysis.stats import bootstrap_mean
from fgvc.devices import model_device
from fgvc.errors import ConfigError
from fgvc.files import write_csv
from fgvc.viz import save_attribution_grid, save_histogram

EXAMPLES = 4  # single-image example files per method
SUMMARY_ROWS = 8  # rows of the summary grid


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def example_indices(labels: torch.Tensor, predictions: torch.Tensor, count: int) -> list[int]:
    """Up to ``count`` images to show, alternating right and wrong predictions while both last,
    each kind taken one designer after another, so even the first two examples show one of
    each and the examples span designers."""
    def by_designer(pool: list[int]) -> list[int]:
        order: list[int] = []
        seen: set[int] = set()
        rest: list[int] = []
        for i in pool:
            (rest if int(labels[i]) in seen else order).append(i)
            seen.add(int(labels[i]))
        return order + rest

    right = by_designer([i for i in range(len(labels)) if int(labels[i]) == int(predictions[i])])
    wrong = by_designer([i for i in range(len(labels)) if int(labels[i]) != int(predictions[i])])
    chosen: list[int] = []
    while len(chosen) < count and (right or wrong):
        for pool in (right, wrong):
            if pool and len(chosen) < count:
                chosen.append(pool.pop(0))
    return chosen


def caption(data: AnalysisData, label: int, predicted: int, value: float | None = None) -> str:
    """``true: X / predicted: Y`` (``WRONG`` when they differ), with the image's background
    preference when known."""
    text = f"true: {data.designer(label)} / predicted: {data.designer(predicted)}"
    if label != predicted:
        text = "WRONG  " + text
    if value is not None:
        text += f"\nbackground preference {value:.2f}"
    return text


class AttributionMethod(AnalysisMethod):
    """Shared by every attribution method: batches, targets, background measures, figures.
    A subclass says how to build its explainer (``explainer``)."""

    def explainer(self, model: nn.Module, data: AnalysisData, cfg: AnalyzeConfig):
        """``(object with .attribute(images, targets) -> AttributionResult, info dict)``."""
        raise NotImplementedError

    def run(self, model: nn.Module, data: AnalysisData, cfg: AnalyzeConfig) -> MethodResult:
        images = data.images.float() / 255.0
        labels = data.labels
        explainer, info = self.explainer(model, data, cfg)
        map_batches, target_batches, prediction_batches = [], [], []
        for rows in _batches(len(images), cfg.batch_size):
            result = explainer.attribute(images[rows], labels[rows] if cfg.target == "label" else None)
            for key in ("mode", "approximation", "engine"):  # how an occlusion map was made
                if getattr(result, key, None) is not None:
                    info[key] = str(getattr(result, key))
            map_batches.append(result.maps.detach())
            target_batches.append(result.targets)
            prediction_batches.append(result.logits.argmax(1))
        maps, targets = torch.cat(map_batches), torch.cat(target_batches)
        predictions = torch.cat(prediction_batches)
        deletion, insertion = [], []
        for rows in _batches(len(images), cfg.batch_size):
            d, i = deletion_insertion_auc(model, images[rows], maps[rows], targets[rows], steps=16)
            deletion.append(d)
            insertion.append(i)
        per_image = {"deletion_auc": torch.cat(deletion), "insertion_auc": torch.cat(insertion)}
        if data.masks is not None:
            per_image["bg_preference"] = bg_preference(maps, data.masks)
            per_image["bg_energy_fraction"] = bg_energy_fraction(maps, data.masks)
        metrics = {"num_images": float(len(images)), "accuracy": (predictions == labels).float().mean().item()}
        for name, values in per_image.items():
            finite = values[torch.isfinite(values)]
            if len(finite):
                interval = bootstrap_mean(finite, seed=cfg.seed)
                metrics.update({f"{name}_mean": interval.estimate, f"{name}_mean_low": interval.low,
                                f"{name}_mean_high": interval.high, f"{name}_median": finite.median().item()})
        payload = {"maps": maps, "targets": targets, "predictions": predictions}
        return MethodResult(metrics, {k: v.tolist() for k, v in per_image.items()}, payload, info)

    def write_artifacts(self, result: MethodResult, data: AnalysisData, folder: Path) -> None:
        maps, predictions = result.payload["maps"], result.payload["predictions"]
        preference = result.per_image.get("bg_preference")
        images = data.images
        title = lambda i: caption(data, int(data.labels[i]), int(predictions[i]),  # noqa: E731
                                  preference[i] if preference else None)
        wrong = lambda i: int(data.labels[i]) != int(predictions[i])  # noqa: E731
        shown = example_indices(data.labels, predictions, SUMMARY_ROWS)
        label = f"{self.name} attribution (scaled to [0, 1] per image)"
        save_attribution_grid(folder / "summary.png", images[shown], maps[shown], [title(i) for i in shown],
                              colorbar_label=label, wrong=[wrong(i) for i in shown])
        for n, i in enumerate(shown[:EXAMPLES]):
            save_attribution_grid(folder / f"example_{n:02d}.png", images[i:i + 1], maps[i:i + 1], [title(i)],
                                  colorbar_label=label, wrong=[wrong(i)])
        if preference:
            save_histogram(folder / "bg_preference_hist.png", torch.tensor(preference),
                           f"{self.name}: background preference (1 = none)", "background preference",
                           reference=(1.0, "no preference"))
        columns = {"dataset_index": data.indices.tolist(),
                   "designer": [data.designer(x) for x in data.labels.tolist()],
                   "predicted": [data.designer(x) for x in predictions.tolist()],
                   "explained": [data.designer(x) for x in result.payload["targets"].tolist()],
                   "correct": [int(a == b) for a, b in zip(data.labels.tolist(), predictions.tolist(), strict=True)]}
        columns.update({k: [round(float(x), 6) for x in v] for k, v in result.per_image.items()})
        write_csv(folder / "per_image.csv", columns)
        torch.save({"maps": maps.half(), "labels": data.labels, "targets": result.payload["targets"],
                    "dataset_index": data.indices}, folder / "maps.pt")


def background_columns(method: str) -> dict[str, Column]:
    return {
        f"{method}_bg_preference": Column(
            "bg_preference_mean", f"{method} bg pref.",
            f"{method}: background preference, mean over images (1 = no preference, >1 = on the background)"),
        f"{method}_bg_fraction": Column(
            "bg_energy_fraction_mean", f"{method} bg share",
            f"{method}: raw share of attribution on the background (no-preference value = the background's "
            f"area share)"),
    }


def stage_map_sizes(model: nn.Module, modules: list[nn.Module], image_size: tuple[int, int]) -> list[tuple]:
    """The spatial size of each module's output for one image of `image_size` ([] if unknown)."""
    sizes: dict[int, tuple] = {}

    def record(k: int):
        def hook(module, inputs, output) -> None:  # returns None: the output is left as it is
            sizes.setdefault(k, tuple(output.shape[-2:]))
        return hook

    hooks = [m.register_forward_hook(record(k)) for k, m in enumerate(modules)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, *image_size, device=model_device(model)))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return [sizes.get(k, ()) for k in range(len(modules))]


def cam_layer(model: nn.Module, image_size: tuple[int, int], layer: str | None) -> tuple[str, nn.Module, tuple]:
    """The Grad-CAM layer: the named module, or (auto) the deepest stage whose map has at least
    MIN_CAM_CELLS cells on its shorter side at this image size (the shallowest when none has)."""
    if layer is not None:
        modules = dict(model.named_modules())
        if layer not in modules:
            names = ", ".join(name for name, _ in getattr(model, "stages", list)()) or "see model.named_modules()"
            raise ConfigError(f"--layer {layer!r}: the model has no module of that name (its stages: {names})")
        return layer, modules[layer], stage_map_sizes(model, [modules[layer]], image_size)[0]
    stages: list[tuple[str, nn.Module]] = getattr(model, "stages", list)()
    if not stages:
        module = model.feature_stage
        if not isinstance(module, nn.Module):
            raise ConfigError(f"{type(model).__name__}: its feature_stage is not a module")
        return getattr(model, "feature_stage_name", "feature_stage"), module, \
            stage_map_sizes(model, [module], image_size)[0]
    sizes = stage_map_sizes(model, [m for _, m in stages], image_size)
    fits = [k for k, size in enumerate(sizes) if len(size) == 2 and min(size) >= MIN_CAM_CELLS]
    k = fits[-1] if fits else 0
    return stages[k][0], stages[k][1], sizes[k]


@register
class GradCAMMethod(AttributionMethod):
    name = "gradcam"
    description = "Grad-CAM (Selvaraju et al., ICCV 2017) at the chosen layer"
    settings = ("layer",)
    columns = background_columns("gradcam")

    def explainer(self, model, data, cfg):
        name, module, size = cam_layer(model, data.image_size, cfg.layer)
        info = {"layer": name, "map_size": "x".join(map(str, size)),
                "layer_rule": "given" if cfg.layer else f"auto: deepest stage with >= {MIN_CAM_CELLS} cells "
                                                        f"on the map's shorter side"}
        return GradCAM(model, target_layer=module), info


@register
class OcclusionMethod(AttributionMethod):
    name = "occlusion"
    description = "occlusion sensitivity (Zeiler & Fergus, ECCV 2014): mean logit drop per pixel"
    settings = ("window", "stride", "fill", "occlusion_mode")
    columns = background_columns("occlusion")

    def explainer(self, model, data, cfg):
        explainer = Occlusion(model, window=cfg.window, stride=cfg.stride, fill=cfg.fill, mode=cfg.occlusion_mode)
        return explainer, {"window": str(cfg.window), "stride": str(cfg.stride), "fill": cfg.fill}

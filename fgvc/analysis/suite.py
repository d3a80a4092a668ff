"""Each analysis method run over a set of images, returning numbers and what the figures need.

Pure: tensors in, records out. `fgvc.tracking.analyze_run` decides names, places and logging.
Metric keys are relative (`bg_energy_fraction_mean`); the caller prefixes the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fgvc.analysis.gradcam import GradCAM
from fgvc.analysis.metrics import bg_energy_fraction, bg_preference, deletion_insertion_auc
from fgvc.analysis.neighbors import cosine_topk, map_at_r, retrieval_metrics
from fgvc.analysis.occlusion import Occlusion
from fgvc.analysis.shortcut import evaluate_variants, make_variants

ATTRIBUTION_METHODS = ("gradcam", "occlusion")
METHODS = ("gradcam", "occlusion", "neighbors", "shortcut")


@dataclass
class AttributionReport:
    method: str
    images: Tensor  # float [N, 3, H, W] in [0, 1]
    maps: Tensor  # [N, H, W] in [0, 1]
    labels: Tensor  # [N]
    targets: Tensor  # [N] class explained
    predictions: Tensor  # [N]
    per_image: dict[str, Tensor]  # name -> [N]
    metrics: dict[str, float] = field(default_factory=dict)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def attribution_report(model: nn.Module, method: str, images: Tensor, labels: Tensor,
                       person_masks: Tensor | None, target: str = "predicted", batch_size: int = 32,
                       occlusion_window: int = 32, occlusion_stride: int = 16,
                       occlusion_fill: str = "zero", auc_steps: int = 16) -> AttributionReport:
    """Maps for every image and, with person masks, how much of each map lies on the
    background (energy fraction, area-normalised preference) plus deletion/insertion AUCs."""
    if method not in ATTRIBUTION_METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose from {ATTRIBUTION_METHODS}")
    if target not in ("predicted", "label"):
        raise ValueError(f"target must be 'predicted' or 'label', got {target!r}")
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images
    maps, targets, preds = [], [], []
    explainer = GradCAM(model) if method == "gradcam" else Occlusion(
        model, window=occlusion_window, stride=occlusion_stride, fill=occlusion_fill)
    for rows in _batches(len(images), batch_size):
        result = explainer.attribute(images[rows], labels[rows] if target == "label" else None)
        maps.append(result.maps.detach())
        targets.append(result.targets)
        preds.append(result.logits.argmax(1))
    maps, targets, preds = torch.cat(maps), torch.cat(targets), torch.cat(preds)
    deletion, insertion = [], []
    for rows in _batches(len(images), batch_size):
        d, i = deletion_insertion_auc(model, images[rows], maps[rows], targets[rows], steps=auc_steps)
        deletion.append(d)
        insertion.append(i)
    per_image = {"deletion_auc": torch.cat(deletion), "insertion_auc": torch.cat(insertion)}
    if person_masks is not None:
        per_image["bg_energy_fraction"] = bg_energy_fraction(maps, person_masks)
        per_image["bg_preference"] = bg_preference(maps, person_masks)
    metrics = {"num_images": float(len(images)),
               "accuracy": (preds == labels).float().mean().item()}
    for name, values in per_image.items():
        finite = values[torch.isfinite(values)]
        if len(finite):
            metrics[f"{name}_mean"] = finite.mean().item()
            metrics[f"{name}_median"] = finite.median().item()
    return AttributionReport(method, images, maps, labels, targets, preds, per_image, metrics)


@dataclass
class NeighborReport:
    indices: Tensor  # [Q, k] into the reference set
    scores: Tensor  # [Q, k] cosine similarity
    metrics: dict[str, float]


def neighbor_report(query: Tensor, reference: Tensor, query_labels: Tensor, ref_labels: Tensor, k: int = 5,
                    query_venues: Tensor | None = None, ref_venues: Tensor | None = None,
                    exclude_same_label: bool = False) -> NeighborReport:
    """Exact cosine top-k of L2-normalised embeddings and the retrieval metrics over all queries.

    With `exclude_same_label` (the original project's mode) the query's own designer is
    removed from its neighbour lists: what remains shows which *other* designers look alike.
    """
    scores, indices = cosine_topk(query, reference, k, query_labels=query_labels, ref_labels=ref_labels,
                                  exclude_same_label=exclude_same_label)
    metrics = retrieval_metrics(query_labels, ref_labels, indices, k,
                                ref_venues=ref_venues, query_venues=query_venues)
    metrics.pop("map_at_r", None)
    if not exclude_same_label:
        metrics["map_at_r"] = map_at_r(query, reference, query_labels, ref_labels)
    return NeighborReport(indices, scores, metrics)


@dataclass
class ShortcutReport:
    variants: dict[str, Tensor]  # name -> uint8 [N, 3, H, W]
    metrics: dict[str, float]


def shortcut_report(model: nn.Module, images: Tensor, person_masks: Tensor, labels: Tensor,
                    num_classes: int, seed: int = 0, batch_size: int = 64) -> ShortcutReport:
    """Background-swap accuracies (Xiao et al., ICLR 2021) on the given images."""
    out = make_variants(images, person_masks, labels, seed=seed)
    variants = {k: v for k, v in out.items() if isinstance(v, Tensor) and v.dim() == 4}
    metrics = evaluate_variants(model, variants, labels, num_classes, batch_size=batch_size)
    metrics["same_fallbacks"] = float(out["same_fallbacks"])
    metrics["rand_fallbacks"] = float(out["rand_fallbacks"])
    metrics["num_images"] = float(len(labels))
    return ShortcutReport(variants, metrics)

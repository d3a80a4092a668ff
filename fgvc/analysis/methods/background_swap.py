"""The background-swap test (Xiao et al., ICLR 2021): accuracy when the person or the backdrop
is removed or swapped. Causal, unlike attribution maps: it changes the input and watches the
prediction. Every accuracy comes with a bootstrap 95% interval over images; BG-gap's is
paired (the same images resampled for both variants)."""

from __future__ import annotations

from pathlib import Path

from fgvc.analysis.methods.base import AnalysisMethod, Column, MethodResult, register
import torch
from torch import nn

from fgvc.analysis.common import eval_mode
from fgvc.analysis.shortcut import VARIANT_NAMES, make_variants
from fgvc.analysis.stats import bootstrap_mean
from fgvc.files import write_csv
from fgvc.viz import save_bar_chart, save_variant_grid
from fgvc.viz.grids import CAPTIONS



def variant_predictions(model: nn.Module, variants: dict[str, torch.Tensor], batch_size: int) -> dict[str, torch.Tensor]:
    """The model's predicted class ``[N]`` for every image of every variant (uint8 or [0, 1])."""
    out = {}
    with eval_mode(model), torch.inference_mode():
        for name, images in variants.items():
            predicted = []
            for start in range(0, len(images), batch_size):
                batch = images[start:start + batch_size]
                batch = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch
                predicted.append(model(batch).argmax(dim=1).cpu())
            out[name] = torch.cat(predicted)
    return out


@register
class ShortcutMethod(AnalysisMethod):
    name = "shortcut"
    description = "background-swap variants (Original, Only-FG, No-FG, Mixed-Same, Mixed-Rand)"
    in_all = False  # asked for by name (it needs person masks and real backdrops)
    needs_masks = True
    settings = ()
    columns = {
        "no_fg_acc": Column("acc_no_fg", "No-FG acc", "accuracy with the person removed and the hole filled from "
                            "the backdrop: the backdrop alone"),
        "no_fg_vs_chance": Column("no_fg_vs_chance", "No-FG / chance", "No-FG accuracy in multiples of chance"),
        "only_fg_acc": Column("acc_only_fg", "Only-FG acc", "accuracy with the background set to black"),
        "bg_gap": Column("bg_gap", "BG-gap", "Mixed-Same minus Mixed-Rand accuracy (paired): how much a backdrop "
                         "of the right designer helps"),
    }

    def run(self, model, data, cfg) -> MethodResult:
        out = make_variants(data.images, data.masks, data.labels, seed=cfg.seed)
        variants = {name: out[name] for name in VARIANT_NAMES}
        predictions = variant_predictions(model, variants, batch_size=cfg.batch_size)
        chance = 1.0 / len(data.names)
        correct = {name: (p == data.labels).float() for name, p in predictions.items()}
        metrics = {"chance": chance, "num_images": float(len(data.labels)),
                   "same_fallbacks": float(out["same_fallbacks"]), "rand_fallbacks": float(out["rand_fallbacks"])}
        measures = {f"acc_{name}": c for name, c in correct.items()}
        measures["bg_gap"] = correct["mixed_same"] - correct["mixed_rand"]
        for key, values in measures.items():
            interval = bootstrap_mean(values, seed=cfg.seed)
            metrics.update({key: interval.estimate, f"{key}_low": interval.low, f"{key}_high": interval.high})
        for suffix in ("", "_low", "_high"):
            metrics[f"no_fg_vs_chance{suffix}"] = metrics[f"acc_no_fg{suffix}"] / chance
        per_image = {f"correct_{name}": c.int().tolist() for name, c in correct.items()}
        return MethodResult(metrics, per_image, {"variants": variants}, {"fill": "see make_variants"})

    def write_artifacts(self, result: MethodResult, data, folder: Path) -> None:
        save_variant_grid(folder / "variants.png", result.payload["variants"], min(6, len(data.labels)))
        m = result.metrics
        save_bar_chart(folder / "accuracy_by_variant.png", [CAPTIONS[n] for n in VARIANT_NAMES],
                       [m[f"acc_{n}"] for n in VARIANT_NAMES], "Accuracy by background variant (95% interval)",
                       chance=m["chance"], low=[m[f"acc_{n}_low"] for n in VARIANT_NAMES],
                       high=[m[f"acc_{n}_high"] for n in VARIANT_NAMES])
        write_csv(folder / "per_image.csv", {"dataset_index": data.indices.tolist(),
                                             "designer": [data.designer(x) for x in data.labels.tolist()],
                                             **result.per_image})

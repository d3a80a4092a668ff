"""The background-swap test (Xiao et al., ICLR 2021): accuracy when the person or the backdrop
is removed or swapped. Causal, unlike attribution maps: it changes the input and watches the
prediction. Every accuracy comes with a bootstrap 95% interval over images; BG-gap's is
paired (the same images resampled for both variants). On Mixed-Rand it also counts how often
the model names the designer whose backdrop the person stands on (the backdrop-follow rate,
beside chance), and it breaks the test down per designer (``per_designer.csv``) with the
No-FG confusion matrix (whose backdrop is taken for whose)."""

from __future__ import annotations

from pathlib import Path

import torch

from fgvc.analysis.methods.base import AnalysisMethod, Column, MethodResult, register
from fgvc.analysis.shortcut import (
    VARIANT_NAMES,
    backdrop_follow_scores,
    make_variants,
    no_fg_confusion,
    per_designer,
    variant_intervals,
    variant_predictions,
    variant_scores,
)
from fgvc.files import write_csv
from fgvc.viz import save_bar_chart, save_confusion_matrix, save_variant_grid
from fgvc.viz.grids import CAPTIONS

FILL_MARGIN = 2  # px around the person's bounding box that No-FG also refills


@register
class ShortcutMethod(AnalysisMethod):
    name = "shortcut"
    description = "background-swap variants (Original, Only-FG, No-FG, Mixed-Same, Mixed-Rand)"
    in_all = False  # asked for by name (it needs person masks and real backdrops)
    needs_masks = True
    settings = ()
    fixed_settings = {"no_fg_fill": "box", "no_fg_margin": str(FILL_MARGIN)}  # the fill's version is part of the key
    columns = {
        "no_fg_acc": Column("acc_no_fg", "No-FG acc", "accuracy with the person removed and the hole filled from "
                            "the backdrop: the backdrop alone"),
        "no_fg_vs_chance": Column("no_fg_vs_chance", "No-FG / chance", "No-FG accuracy in multiples of chance"),
        "only_fg_acc": Column("acc_only_fg", "Only-FG acc", "accuracy with the background set to black"),
        "bg_gap": Column("bg_gap", "BG-gap", "Mixed-Same minus Mixed-Rand accuracy (paired): how much a backdrop "
                         "of the right designer helps"),
        "backdrop_follow": Column("backdrop_follow", "Backdrop-follow", "share of Mixed-Rand swaps (the person on "
                                  "another designer's backdrop) predicted as the backdrop's designer; chance is "
                                  "1/C, a garment reader stays below it"),
    }

    def run(self, model, data, cfg) -> MethodResult:
        out = make_variants(data.images, data.masks, data.labels, seed=cfg.seed, margin=FILL_MARGIN)
        variants = {name: out[name] for name in VARIANT_NAMES}
        predicted_on_device = variant_predictions(model, variants, batch_size=cfg.batch_size)
        # predictions, labels and backdrop partners come back from the model's device in one transfer
        rows = torch.stack([*(predicted_on_device[n] for n in VARIANT_NAMES), data.labels.long(),
                            out["partner_rand"].long()]).cpu()
        predicted = dict(zip(VARIANT_NAMES, rows[:len(VARIANT_NAMES)], strict=True))
        labels, partner = rows[-2], rows[-1]
        correct = {name: p == labels for name, p in predicted.items()}
        num_classes = len(data.names)
        chance = 1.0 / num_classes
        metrics = {**variant_scores(correct, num_classes),
                   **variant_intervals(correct, chance, seed=cfg.seed),
                   **backdrop_follow_scores(predicted["mixed_rand"], labels, partner, chance, seed=cfg.seed),
                   "num_images": float(len(data.labels)), "same_fallbacks": float(out["same_fallbacks"]),
                   "rand_fallbacks": float(out["rand_fallbacks"]),
                   "no_fg_filled_share": float(out["no_fg_filled_share"])}
        backdrop = labels[partner]
        per_image = {**{f"correct_{name}": c.int().tolist() for name, c in correct.items()},
                     "predicted_mixed_rand": predicted["mixed_rand"].tolist(),
                     "backdrop_label": backdrop.tolist(),
                     "follows_backdrop": (predicted["mixed_rand"] == backdrop).int().tolist(),
                     "predicted_no_fg": predicted["no_fg"].tolist()}
        payload = {"variants": variants, "per_designer": per_designer(labels, predicted, partner, num_classes),
                   "no_fg_confusion": no_fg_confusion(labels, predicted["no_fg"], num_classes)}
        info = {"no_fg_fill": f"the person's bounding box (+{FILL_MARGIN} px) refilled from the backdrop beside it"}
        return MethodResult(metrics, per_image, payload, info)

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
        write_csv(folder / "per_designer.csv", [{"designer": data.designer(row["label"]), **row}
                                                for row in result.payload["per_designer"]])
        confusion = result.payload["no_fg_confusion"]
        save_confusion_matrix(folder / "no_fg_confusion.png", confusion, data.names,
                              f"No-FG confusion\n(the backdrop alone, {int(confusion.sum())} images)",
                              row_label="backdrop's designer", column_label="predicted on No-FG",
                              share_label="share of the backdrop's images", row_counts=True)

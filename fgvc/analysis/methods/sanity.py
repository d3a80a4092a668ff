"""`analyze --method sanity`: the model-parameter randomisation test (fgvc.analysis.sanity) for
every attribution method of `--method all`, with the same settings (Grad-CAM layer, occlusion
window) as their own records. Metrics per method: ``<method>_corr_<k>`` (mean rank correlation
after step k, with its interval), ``<method>_full_randomisation`` (the last step) and
``<method>_flagged`` (1 when the maps survive full randomisation)."""

from __future__ import annotations

from pathlib import Path

import torch

from fgvc.analysis.common import eval_mode
from fgvc.analysis.methods.attribution import AttributionMethod
from fgvc.analysis.methods.base import METHODS, AnalysisMethod, Column, MethodResult, register
from fgvc.analysis.sanity import FLAG_THRESHOLD, cascading_randomisation
from fgvc.files import write_csv
from fgvc.viz.plots import save_sanity_curve


def attribution_methods() -> dict[str, AttributionMethod]:
    return {name: m for name, m in METHODS.items() if isinstance(m, AttributionMethod) and m.in_all}


def _maps_of(method: AttributionMethod, data, cfg):
    def maps(model, images, targets):
        explainer, _ = method.explainer(model, data, cfg)
        out = [explainer.attribute(images[i:i + cfg.batch_size], targets[i:i + cfg.batch_size]).maps.detach().cpu()
               for i in range(0, len(images), cfg.batch_size)]
        return torch.cat(out)
    return maps


@register
class SanityMethod(AnalysisMethod):
    name = "sanity"
    description = ("model-parameter randomisation (Adebayo et al., NeurIPS 2018): rank correlation of each "
                   "attribution method's maps before and after randomising the network from the head down")
    in_all = False  # once per architecture in a study, or asked for by name
    settings = ("layer", "window", "stride", "fill", "occlusion_mode")
    fixed_settings = {"cascade": "head, stages deep to shallow, stem", "correlation": "spearman"}

    @property
    def columns(self) -> dict[str, Column]:
        return {f"{name}_sanity": Column(
            f"{name}_full_randomisation", f"{name} sanity",
            f"{name}: mean Spearman correlation of its maps with those of a fully randomised network (Adebayo et "
            f"al. 2018; flagged at >= {FLAG_THRESHOLD}: the map then describes the image, not the model)")
            for name in attribution_methods()}

    def run(self, model, data, cfg) -> MethodResult:
        images = data.images.float() / 255.0
        if cfg.target == "label":
            targets = data.labels.clone()
        else:
            device = next(model.parameters()).device
            with eval_mode(model), torch.no_grad():
                targets = torch.cat([model(images[i:i + cfg.batch_size].to(device)).argmax(1)
                                     for i in range(0, len(images), cfg.batch_size)])
        methods = attribution_methods()
        curves = cascading_randomisation(model, images, targets,
                                         {name: _maps_of(m, data, cfg) for name, m in methods.items()},
                                         seed=cfg.seed)
        metrics: dict[str, float] = {"num_images": float(len(images)), "flag_threshold": FLAG_THRESHOLD}
        per_image: dict[str, list] = {}
        for name, curve in curves.items():
            for k, interval in enumerate(curve.intervals):
                metrics.update({f"{name}_corr_{k:02d}": interval.estimate, f"{name}_corr_{k:02d}_low": interval.low,
                                f"{name}_corr_{k:02d}_high": interval.high})
                per_image[f"{name}_corr_{k:02d}"] = curve.per_image[k].tolist()
            full = curve.after_full_randomisation
            metrics.update({f"{name}_full_randomisation": full.estimate, f"{name}_full_randomisation_low": full.low,
                            f"{name}_full_randomisation_high": full.high, f"{name}_flagged": float(curve.flagged)})
        steps = next(iter(curves.values())).steps if curves else []
        info = {"steps": " | ".join(f"{k}: {s}" for k, s in enumerate(steps)),
                "flagged": ",".join(n for n, c in curves.items() if c.flagged) or "none"}
        return MethodResult(metrics, per_image, {"curves": curves}, info)

    def write_artifacts(self, result: MethodResult, data, folder: Path) -> None:
        curves = result.payload["curves"]
        save_sanity_curve(folder / "sanity_curve.png", {n: c.steps for n, c in curves.items()},
                          {n: [(i.estimate, i.low, i.high) for i in c.intervals] for n, c in curves.items()},
                          FLAG_THRESHOLD)
        write_csv(folder / "per_image.csv", {"dataset_index": data.indices.tolist(), **result.per_image})

"""Feature-space nearest neighbours: does the embedding group images by designer, or by venue?

Queries are the analysed images, the reference set is the root's training split; both are
embedded with ``model.forward_features`` (L2-normalised) and searched exactly by cosine
similarity. Besides precision@1, recall@k and mAP@R, the demo data's venue ids give the
shortcut signal: the share of neighbours from the query's venue but another designer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fgvc.analysis.methods.base import AnalysisMethod, Column, MethodResult, register
from fgvc.analysis.neighbors import cosine_topk, embed, map_at_r, retrieval_metrics
from fgvc.analysis.stats import bootstrap_mean
from fgvc.data.dataset import BatchLoader, ShardDataset
from fgvc.files import write_csv
from fgvc.viz import save_neighbor_grid

REFERENCE_SPLIT = "train"
GRID_ROWS = 8


@register
class NeighborsMethod(AnalysisMethod):
    name = "neighbors"
    description = "nearest neighbours in feature space (exact cosine top-k against the training split)"
    settings = ("k", "exclude_same_designer")
    columns = {
        "precision_at_1": Column("precision_at_1", "P@1", "retrieval precision@1 in embedding space (same designer)"),
        "same_venue_other_designer": Column(
            "same_venue_other_label_fraction_at_k", "venue, not designer",
            "share of the top-k neighbours from the query's venue but another designer (demo data)", interval=False),
    }

    def run(self, model, data, cfg) -> MethodResult:
        reference = ShardDataset(data.root, REFERENCE_SPLIT)
        batch = cfg.batch_size * 4
        ref_emb = embed(model, (b.images for b in BatchLoader(reference, batch, prefetch=0)))
        query_emb = embed(model, (data.images[s:s + batch] for s in range(0, len(data.images), batch)))
        ref_items = reference.gather(torch.arange(len(reference)))
        scores, indices = cosine_topk(query_emb, ref_emb, cfg.k, query_labels=data.labels,
                                      ref_labels=reference.labels, exclude_same_label=cfg.exclude_same_designer)
        metrics = retrieval_metrics(data.labels, reference.labels, indices, cfg.k, ref_venues=ref_items.get("venues"),
                                    query_venues=data.venues)
        metrics.pop("map_at_r", None)
        if not cfg.exclude_same_designer:
            metrics["map_at_r"] = map_at_r(query_emb, ref_emb, data.labels, reference.labels)
            hit = (reference.labels[indices[:, 0].clamp(min=0)] == data.labels).float()
            interval = bootstrap_mean(hit, seed=cfg.seed)
            metrics.update(precision_at_1_low=interval.low, precision_at_1_high=interval.high)
        metrics.update(num_queries=float(len(data.labels)), num_reference=float(len(reference)))
        payload = {"indices": indices, "scores": scores, "reference": reference, "ref_images": ref_items["images"]}
        return MethodResult(metrics, {}, payload, {"reference": f"{data.root} ({REFERENCE_SPLIT})"})

    def write_artifacts(self, result: MethodResult, data, folder: Path) -> None:
        indices, scores, reference = result.payload["indices"], result.payload["scores"], result.payload["reference"]
        rows = min(GRID_ROWS, len(data.labels))
        save_neighbor_grid(folder / "neighbors_grid.png", data.images[:rows], result.payload["ref_images"],
                           indices[:rows], data.labels[:rows], reference.labels, data.names, scores=scores[:rows])
        ref_index = reference.indices
        write_csv(folder / "neighbors.csv", {
            "query_dataset_index": data.indices.tolist(),
            "query_designer": [data.designer(x) for x in data.labels.tolist()],
            "neighbor_dataset_indices": [" ".join(str(int(ref_index[j])) if j >= 0 else "-" for j in row)
                                         for row in indices.tolist()],
            "neighbor_designers": [" | ".join(data.designer(int(reference.labels[j])) if j >= 0 else "-" for j in row)
                                   for row in indices.tolist()],
            "cosine_similarities": [" ".join(f"{s:.4f}" for s in row) for row in scores.tolist()]})

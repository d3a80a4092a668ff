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
from fgvc.data.dataset import ShardDataset
from fgvc.files import write_csv
from fgvc.viz import save_neighbor_grid

REFERENCE_SPLIT = "train"
GRID_ROWS = 8


class ReferenceSet:
    """The retrieval reference split, read in batches of ``batch`` images (never whole): its
    embeddings are made batch by batch on the model's device; the grid reads back only the
    neighbours it shows."""

    def __init__(self, root, split: str, batch: int):
        self.dataset, self.batch = ShardDataset(root, split), batch
        self.venues = None  # int64 [N] (demo data): small, read from the shards' own columns
        if "venues" in self.dataset.keys:
            self.venues = torch.cat([shard["venues"] for shard in self.dataset.shards])[self.dataset.indices]

    def image_batches(self, device: torch.device):
        """uint8 ``[b, 3, H, W]`` batches on ``device``, in dataset order."""
        for start in range(0, len(self.dataset), self.batch):
            positions = torch.arange(start, min(start + self.batch, len(self.dataset)))
            yield self.dataset.gather(positions)["images"].to(device)

    def images_at(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, grid_indices)``: uint8 images of the reference items ``indices`` ``[Q, k]``
        names, and ``indices`` renumbered into them (``-1`` kept)."""
        wanted, renumbered = indices.clamp(min=0).flatten().unique(return_inverse=True)
        grid = torch.where(indices >= 0, renumbered.reshape(indices.shape), -1)
        return self.dataset.gather(wanted)["images"], grid


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
        device = data.images.device  # the model's: the caller put the analysed data there
        reference = ReferenceSet(data.root, REFERENCE_SPLIT, batch=cfg.batch_size * 4)
        ref_emb = embed(model, reference.image_batches(device))
        query_emb = embed(model, (data.images[s:s + reference.batch] for s in range(0, len(data.images),
                                                                                     reference.batch)))
        ref_labels = reference.dataset.labels.to(device)
        scores, indices = cosine_topk(query_emb, ref_emb, cfg.k, query_labels=data.labels,
                                      ref_labels=ref_labels, exclude_same_label=cfg.exclude_same_designer)
        metrics = retrieval_metrics(data.labels, ref_labels, indices, cfg.k, query_venues=data.venues,
                                    ref_venues=None if reference.venues is None else reference.venues.to(device))
        metrics.pop("map_at_r", None)
        if not cfg.exclude_same_designer:
            metrics["map_at_r"] = map_at_r(query_emb, ref_emb, data.labels, ref_labels)
            hit = (ref_labels[indices[:, 0].clamp(min=0)] == data.labels).float()
            interval = bootstrap_mean(hit, seed=cfg.seed)
            metrics.update(precision_at_1_low=interval.low, precision_at_1_high=interval.high)
        metrics.update(num_queries=float(len(data.labels)), num_reference=float(len(reference.dataset)))
        indices, scores = indices.cpu(), scores.cpu()
        grid_images, grid_indices = reference.images_at(indices[:GRID_ROWS])
        payload = {"indices": indices, "scores": scores, "reference": reference.dataset,
                   "grid_images": grid_images, "grid_indices": grid_indices}
        return MethodResult(metrics, {}, payload, {"reference": f"{data.root} ({REFERENCE_SPLIT})"})

    def write_artifacts(self, result: MethodResult, data, folder: Path) -> None:
        indices, scores, reference = result.payload["indices"], result.payload["scores"], result.payload["reference"]
        rows = min(GRID_ROWS, len(data.labels))
        grid_indices = result.payload["grid_indices"][:rows]
        grid_labels = torch.where(grid_indices >= 0, reference.labels[indices[:rows].clamp(min=0)], -1)
        save_neighbor_grid(folder / "neighbors_grid.png", data.images[:rows], result.payload["grid_images"],
                           grid_indices, data.labels[:rows], _labels_by_grid_index(grid_indices, grid_labels),
                           data.names, scores=scores[:rows])
        ref_index = reference.indices
        write_csv(folder / "neighbors.csv", {
            "query_dataset_index": data.indices.tolist(),
            "query_designer": [data.designer(x) for x in data.labels.tolist()],
            "neighbor_dataset_indices": [" ".join(str(int(ref_index[j])) if j >= 0 else "-" for j in row)
                                         for row in indices.tolist()],
            "neighbor_designers": [" | ".join(data.designer(int(reference.labels[j])) if j >= 0 else "-" for j in row)
                                   for row in indices.tolist()],
            "cosine_similarities": [" ".join(f"{s:.4f}" for s in row) for row in scores.tolist()]})


def _labels_by_grid_index(grid_indices: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Labels of the grid's images, indexed as ``grid_indices`` numbers them."""
    out = torch.full((int(grid_indices.max()) + 1 if grid_indices.numel() else 0,), -1, dtype=torch.long)
    keep = grid_indices >= 0
    out[grid_indices[keep]] = labels[keep]
    return out

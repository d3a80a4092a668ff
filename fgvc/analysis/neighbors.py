"""Feature-space nearest neighbours: embeddings, exact cosine top-k, retrieval metrics.

Cosine similarity of L2-normalised embeddings is an inner product, so the search is an
exact blockwise matrix product followed by ``torch.topk`` (the same computation as faiss
``IndexFlatIP``). Memory is bounded by one ``query_chunk x reference_chunk`` block of
similarities.

mAP@R follows Musgrave et al., "A Metric Learning Reality Check", ECCV 2020: for a query
with ``R`` relevant reference items, ``AP@R = (1/R) * sum_{i<=R} P(i) * rel(i)`` over the
first ``R`` neighbours, where ``P(i)`` is the precision at rank ``i``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from fgvc.analysis.common import eval_mode
from fgvc.models.net import FGVCNet

BLOCK_ELEMENTS = 2**25  # similarities held at once by default: 128 MiB in float32
REFERENCE_CHUNK = 32768


def embed(model: FGVCNet, batches: Iterable) -> Tensor:
    """``[N, D]`` L2-normalised ``model.forward_features`` of every image in ``batches``
    (an iterable of ``[b, 3, H, W]`` tensors, float in [0, 1] or uint8; for
    ``(images, labels, ...)`` tuples the first element is used), in eval mode."""
    chunks = []
    with eval_mode(model), torch.inference_mode():
        for images in batches:
            if isinstance(images, (tuple, list)):
                images = images[0]
            if images.dtype == torch.uint8:
                images = images.float() / 255.0
            chunks.append(F.normalize(model.forward_features(images).float(), dim=1))
    if not chunks:
        raise ValueError("no batches to embed")
    return torch.cat(chunks).clone()


def _excluded(
    rows: slice,
    cols: slice,
    exclude: Tensor | None,
    query_labels: Tensor | None,
    ref_labels: Tensor | None,
    exclude_same_label: bool,
    device: torch.device,
) -> Tensor | None:
    """Bool ``[q, r]`` block of reference items that may not be returned, or None."""
    blocked = None
    if exclude is not None:
        ex = exclude[rows]
        ex = ex[:, None] if ex.dim() == 1 else ex
        col_ids = torch.arange(cols.start, cols.stop, device=device)
        blocked = (ex[:, :, None] == col_ids[None, None, :]).any(dim=1)
    if exclude_same_label:
        if query_labels is None or ref_labels is None:
            raise ValueError("exclude_same_label needs query_labels and ref_labels")
        same = query_labels[rows, None] == ref_labels[None, cols]
        blocked = same if blocked is None else blocked | same
    return blocked


def cosine_topk(
    query: Tensor,
    reference: Tensor,
    k: int,
    exclude: Tensor | None = None,
    *,
    query_labels: Tensor | None = None,
    ref_labels: Tensor | None = None,
    exclude_same_label: bool = False,
    query_chunk: int | None = None,
    reference_chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` inner products of L2-normalised ``query`` ``[Q, D]`` against
    ``reference`` ``[R, D]`` (cosine similarity; inputs are not re-normalised).

    Args:
        exclude: int64 ``[Q]`` or ``[Q, E]`` reference indices never returned for that
            query (e.g. ``arange(Q)`` when the query set is the reference set); ``-1`` pads.
        exclude_same_label: also skip references whose label equals the query's label
            (needs ``query_labels`` and ``ref_labels``): "nearest other designer" mode.
        query_chunk, reference_chunk: block of the similarity matrix computed at once;
            by default ``min(R, 32768)`` references and as many queries as keep the block
            within :data:`BLOCK_ELEMENTS`.

    Returns:
        ``(scores [Q, k], indices [Q, k])`` sorted by decreasing similarity. Slots left
        without a candidate (everything excluded) hold score ``-inf`` and index ``-1``.
    """
    if exclude_same_label and (query_labels is None or ref_labels is None):
        raise ValueError("exclude_same_label needs query_labels and ref_labels")
    n_query, n_ref = query.shape[0], reference.shape[0]
    k_eff = min(k, n_ref)
    reference_chunk = reference_chunk or max(1, min(n_ref, REFERENCE_CHUNK))
    query_chunk = query_chunk or max(1, BLOCK_ELEMENTS // reference_chunk)
    if exclude is not None:
        exclude = torch.as_tensor(exclude, dtype=torch.long, device=query.device)
        if exclude.shape[0] != n_query:
            raise ValueError(f"exclude has {exclude.shape[0]} rows for {n_query} queries")
    scores = torch.full((n_query, k), float("-inf"), dtype=query.dtype, device=query.device)
    indices = torch.full((n_query, k), -1, dtype=torch.long, device=query.device)

    def blocked(rows: slice, cols: slice) -> Tensor | None:
        return _excluded(rows, cols, exclude, query_labels, ref_labels, exclude_same_label, query.device)

    for q0 in range(0, n_query, query_chunk):
        rows = slice(q0, min(q0 + query_chunk, n_query))
        scores[rows, :k_eff], indices[rows, :k_eff] = _rows_topk(query, reference, rows, k_eff, reference_chunk,
                                                                 blocked)
    return scores, indices


def _rows_topk(query: Tensor, reference: Tensor, rows: slice, k: int, reference_chunk: int,
               blocked: Callable[[slice, slice], Tensor | None]) -> tuple[Tensor, Tensor]:
    """Top-``k`` of the queries ``query[rows]`` against all of ``reference``, one block of
    ``reference_chunk`` references at a time, each block's best merged into the running best.
    ``blocked(rows, cols)``: the bool block of excluded references, or None. Index ``-1``
    where the score is ``-inf`` (no candidate)."""
    best: tuple[Tensor, Tensor] | None = None
    for r0 in range(0, reference.shape[0], reference_chunk):
        cols = slice(r0, min(r0 + reference_chunk, reference.shape[0]))
        sims = query[rows] @ reference[cols].T
        blocked_here = blocked(rows, cols)
        if blocked_here is not None:
            sims.masked_fill_(blocked_here, float("-inf"))
        s, i = sims.topk(min(k, sims.shape[1]), dim=1)
        i = i + r0
        if best is not None:
            merged = torch.cat([best[0], s], 1)
            s, pick = merged.topk(min(k, merged.shape[1]), dim=1)
            i = torch.cat([best[1], i], 1).gather(1, pick)
        best = s, i
    if best is None:  # an empty reference set: no candidate for any query
        n = len(range(*rows.indices(query.shape[0])))
        return query.new_empty((n, 0)), torch.empty((n, 0), dtype=torch.long, device=query.device)
    best_s, best_i = best
    return best_s, best_i.masked_fill(torch.isneginf(best_s), -1)


def _labels_at(ref_labels: Tensor, indices: Tensor) -> Tensor:
    """Labels of the neighbours ``[Q, k]``; ``-1`` indices map to ``-1``."""
    safe = indices.clamp(min=0)
    return torch.where(indices >= 0, ref_labels[safe], torch.full_like(safe, -1))


def average_precision_at_r(relevant: Tensor, num_relevant: Tensor) -> Tensor:
    """AP@R per query from ``relevant`` ``[Q, >=max R]`` (bool, rank order) and
    ``num_relevant`` ``[Q]``. Queries with ``R = 0`` get NaN."""
    width = relevant.shape[1]
    ranks = torch.arange(1, width + 1, device=relevant.device)
    within_r = ranks[None, :] <= num_relevant[:, None]
    hits = (relevant & within_r).float()
    precision = hits.cumsum(dim=1) / ranks[None, :]
    total = (precision * hits).sum(dim=1)
    r = num_relevant.float()
    return torch.where(r > 0, total / r.clamp(min=1), torch.full_like(total, float("nan")))


def retrieval_metrics(
    query_labels: Tensor,
    ref_labels: Tensor,
    indices: Tensor,
    k: int,
    ref_venues: Tensor | None = None,
    query_venues: Tensor | None = None,
    num_relevant: Tensor | None = None,
) -> dict[str, float]:
    """Retrieval quality of the ranked neighbour lists ``indices`` ``[Q, >=k]``.

    Returns a dict with
      - ``precision_at_1``: share of queries whose first neighbour has the query's label;
      - ``recall_at_k``: share of queries with at least one same-label item in the top k;
      - ``same_label_fraction_at_k``: share of all top-k neighbours with the query's label;
      - ``map_at_r``: mean AP@R over queries with ``R > 0``; only present when every such
        query's list holds at least ``R`` entries (``R`` = ``num_relevant``, default: the
        number of reference items with the query's label);
      - with venues: ``same_venue_fraction_at_k`` and ``same_venue_other_label_fraction_at_k``
        (neighbours sharing the query's venue but not its label: the shortcut signal).

    Index ``-1`` (no candidate) counts as a non-matching neighbour.
    """
    if indices.shape[1] < k:
        raise ValueError(f"indices hold {indices.shape[1]} neighbours, fewer than k={k}")
    query_labels = torch.as_tensor(query_labels).long()
    ref_labels = torch.as_tensor(ref_labels).long()
    top = indices[:, :k]
    same = _labels_at(ref_labels, top) == query_labels[:, None]
    out = {
        "precision_at_1": same[:, 0].float().mean().item(),
        "recall_at_k": same.any(dim=1).float().mean().item(),
        "same_label_fraction_at_k": same.float().mean().item(),
    }
    if num_relevant is None:
        counts = torch.bincount(ref_labels, minlength=int(query_labels.max()) + 1)
        num_relevant = counts[query_labels]
    num_relevant = torch.as_tensor(num_relevant).long()
    longest = int(num_relevant.max()) if num_relevant.numel() else 0
    if longest <= indices.shape[1]:
        full = _labels_at(ref_labels, indices[:, : max(longest, 1)]) == query_labels[:, None]
        ap = average_precision_at_r(full, num_relevant)
        defined = ~torch.isnan(ap)
        out["map_at_r"] = ap[defined].mean().item() if defined.any() else float("nan")
    if ref_venues is not None and query_venues is not None:
        ref_venues = torch.as_tensor(ref_venues).long()
        query_venues = torch.as_tensor(query_venues).long()
        same_venue = _labels_at(ref_venues, top) == query_venues[:, None]
        same_venue &= top >= 0
        out["same_venue_fraction_at_k"] = same_venue.float().mean().item()
        out["same_venue_other_label_fraction_at_k"] = (same_venue & ~same).float().mean().item()
    return out


def map_at_r(
    query: Tensor,
    reference: Tensor,
    query_labels: Tensor,
    ref_labels: Tensor,
    exclude: Tensor | None = None,
    query_chunk: int = 256,
) -> float:
    """mAP@R computed from embeddings (``[Q, D]``, ``[R, D]``, L2-normalised), ranking each
    chunk of queries against the whole reference set. ``R`` per query is the number of
    non-excluded reference items with its label; queries with ``R = 0`` are skipped
    (NaN when all are). ``exclude`` as in :func:`cosine_topk`. Memory: ``query_chunk x R``."""
    query_labels = torch.as_tensor(query_labels).long()
    ref_labels = torch.as_tensor(ref_labels).long()
    if exclude is not None:
        exclude = torch.as_tensor(exclude, dtype=torch.long)
    n_ref = reference.shape[0]
    ap_all = []
    for q0 in range(0, query.shape[0], query_chunk):
        rows = slice(q0, min(q0 + query_chunk, query.shape[0]))
        sims = query[rows] @ reference.T
        blocked = _excluded(rows, slice(0, n_ref), exclude, None, None, False, query.device)
        relevant_all = query_labels[rows, None] == ref_labels[None, :]
        if blocked is not None:
            sims.masked_fill_(blocked, float("-inf"))
            relevant_all &= ~blocked
        num_relevant = relevant_all.sum(dim=1)
        depth = max(int(num_relevant.max()), 1)
        order = sims.topk(depth, dim=1).indices
        ap_all.append(average_precision_at_r(relevant_all.gather(1, order), num_relevant))
    ap = torch.cat(ap_all)
    defined = ~torch.isnan(ap)
    return ap[defined].mean().item() if defined.any() else float("nan")

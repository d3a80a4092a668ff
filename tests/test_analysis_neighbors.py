import math

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgvc.analysis import cosine_topk, embed, map_at_r, retrieval_metrics


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def _angles(degrees):
    rad = torch.tensor(degrees, dtype=torch.float32) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def test_cosine_topk_matches_brute_force_and_faiss():
    query, reference = _unit(50, 16, 0), _unit(300, 16, 1)
    scores, indices = cosine_topk(query, reference, k=7, query_chunk=7, reference_chunk=64)

    full = query @ reference.T
    brute = full.argsort(dim=1, descending=True)[:, :7]
    assert torch.equal(indices, brute)
    assert torch.allclose(scores, full.gather(1, brute), atol=1e-6)

    index = faiss.IndexFlatIP(16)
    index.add(reference.numpy())
    faiss_scores, faiss_indices = index.search(query.numpy(), 7)
    assert np.array_equal(indices.numpy(), faiss_indices)
    assert np.allclose(scores.numpy(), faiss_scores, atol=1e-5)


def test_exclude_self_and_same_label():
    embeddings = _unit(40, 8, 2)
    labels = torch.arange(40) % 4
    _, indices = cosine_topk(
        embeddings, embeddings, k=5, exclude=torch.arange(40), reference_chunk=16
    )
    assert not (indices == torch.arange(40)[:, None]).any()
    full = embeddings @ embeddings.T
    full.fill_diagonal_(float("-inf"))
    assert torch.equal(indices, full.argsort(dim=1, descending=True)[:, :5])

    _, other = cosine_topk(
        embeddings, embeddings, k=5, query_labels=labels, ref_labels=labels, exclude_same_label=True
    )
    assert (labels[other] != labels[:, None]).all()


def test_k_larger_than_candidates_pads():
    query, reference = _unit(2, 4, 3), _unit(3, 4, 4)
    scores, indices = cosine_topk(query, reference, k=5, exclude=torch.tensor([[0, -1], [1, 2]]))
    assert indices.shape == (2, 5)
    assert (indices[0, 2:] == -1).all() and (indices[1, 1:] == -1).all()
    assert torch.isneginf(scores[0, 2:]).all()
    assert set(indices[0, :2].tolist()) == {1, 2} and indices[1, 0] == 0


def test_an_empty_reference_set_gives_every_query_no_candidate():
    scores, indices = cosine_topk(_unit(3, 4, 5), torch.empty(0, 4), k=2)
    assert indices.shape == (3, 2) and (indices == -1).all()
    assert torch.isneginf(scores).all()


def test_retrieval_metrics_hand_computed():
    ref_labels = torch.tensor([0, 0, 1, 1, 2])
    ref_venues = torch.tensor([0, 1, 0, 1, 0])
    query_labels = torch.tensor([0, 1])
    query_venues = torch.tensor([0, 1])
    # query 0 sees labels [1, 0, 2]; query 1 sees labels [1, 0, 1]
    indices = torch.tensor([[2, 0, 4], [3, 1, 2]])
    m = retrieval_metrics(query_labels, ref_labels, indices, k=3, ref_venues=ref_venues,
                          query_venues=query_venues)
    assert m["precision_at_1"] == pytest.approx(0.5)  # (0 + 1) / 2
    assert m["recall_at_k"] == pytest.approx(1.0)
    assert m["same_label_fraction_at_k"] == pytest.approx(0.5)  # (1 + 2) / 6
    # R = 2 for both: AP(q0) = (1/2 * 1/2) = 0.25, AP(q1) = (1 * 1) / 2 = 0.5
    assert m["map_at_r"] == pytest.approx(0.375)
    assert m["same_venue_fraction_at_k"] == pytest.approx(5 / 6)
    # q0: refs 2 and 4 share venue 0 with another label; q1: ref 1 shares venue 1
    assert m["same_venue_other_label_fraction_at_k"] == pytest.approx(0.5)


def test_retrieval_metrics_without_enough_depth_omits_map():
    ref_labels = torch.tensor([0, 0, 0, 1])
    m = retrieval_metrics(torch.tensor([0]), ref_labels, torch.tensor([[3, 0]]), k=2)
    assert "map_at_r" not in m
    assert m["precision_at_1"] == 0.0 and m["recall_at_k"] == 1.0


def test_map_at_r_from_embeddings():
    reference = _angles([10, 20, 30, 40])
    ref_labels = torch.tensor([0, 1, 0, 1])
    # query at 35 deg, label 0: ranking 30 (hit), 40 -> AP = 0.5
    # query at 100 deg, label 0: ranking 40, 30 (hit) -> AP = 0.25
    query = _angles([35, 100])
    assert map_at_r(query, reference, torch.tensor([0, 0]), ref_labels) == pytest.approx(0.375)

    embeddings, labels = _unit(60, 8, 5), torch.arange(60) % 3
    _, ranked = cosine_topk(embeddings, embeddings, k=59, exclude=torch.arange(60))
    relevant = torch.full((60,), 19)  # 20 per label, minus the query itself
    from_ranking = retrieval_metrics(labels, labels, ranked, k=5, num_relevant=relevant)
    direct = map_at_r(
        embeddings, embeddings, labels, labels, exclude=torch.arange(60), query_chunk=16
    )
    assert direct == pytest.approx(from_ranking["map_at_r"], abs=1e-6)


class FixedFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Linear(1, 1)

    def forward_features(self, x):
        assert not self.training
        return x.flatten(1)[:, :3] * 2.0


def test_embed_normalises_and_concatenates():
    model = FixedFeatures().train()
    batches = [torch.rand(2, 3, 4, 4), (torch.rand(3, 3, 4, 4) * 255).to(torch.uint8)]
    out = embed(model, batches)
    assert torch.equal(embed(model, [(b, torch.zeros(len(b))) for b in batches]), out)
    assert out.shape == (5, 3)
    assert torch.allclose(out.norm(dim=1), torch.ones(5))
    assert torch.allclose(out[:2], F.normalize(batches[0].flatten(1)[:, :3], dim=1))
    assert model.training

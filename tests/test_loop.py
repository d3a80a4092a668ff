"""The training loop's pieces: optimiser groups, evaluation metrics, NaN guard."""

import math

import pytest
import torch
import torch.nn as nn

from fgvc.data.dataset import BatchLoader, ShardDataset
from fgvc.models import create_model
from fgvc.training.loop import NonFiniteLoss, build_optimizer, evaluate, group_lrs, result_from_confusion, train_one_epoch


def test_optimizer_has_backbone_and_head_rates_and_no_decay_on_norms():
    model = create_model("fn-small", 3, pretrained=False)
    opt = build_optimizer(model, lr_backbone=1e-4, lr_head=1e-3, weight_decay=0.05)
    assert group_lrs(opt) == (1e-4, 1e-3)
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(list(model.parameters())) == len({id(p) for p in grouped})
    decay, no_decay = opt.param_groups[0::2], opt.param_groups[1::2]
    assert all(g["weight_decay"] == 0.05 and all(p.ndim > 1 for p in g["params"]) for g in decay)
    assert all(g["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in g["params"]) for g in no_decay)


def test_metrics_from_confusion_by_hand():
    # rows = true class; class 2 absent from the split
    confusion = torch.tensor([[3, 1, 0], [2, 2, 0], [0, 0, 0]])
    r = result_from_confusion(confusion, loss_sum=8.0, top5_hits=8)
    assert r.images == 8 and r.acc == pytest.approx(5 / 8) and r.loss == pytest.approx(1.0)
    assert r.per_class_acc[:2] == pytest.approx([0.75, 0.5]) and math.isnan(r.per_class_acc[2])
    assert r.balanced_acc == pytest.approx(0.625)


def test_evaluate_counts_every_image_once(tiny_root):
    ds = ShardDataset(tiny_root, "val")
    model = create_model("fn-small", ds.num_classes, pretrained=False).eval()
    r = evaluate(model, BatchLoader(ds, 5, prefetch=0), ds.num_classes, torch.device("cpu"))
    assert r.images == len(ds) == 12 and int(r.confusion.sum()) == 12
    assert r.confusion.sum(1).tolist() == ds.class_counts()
    with torch.no_grad():
        x = ds.gather(torch.arange(len(ds)))
        pred = model(x["images"].float() / 255).argmax(1)
    assert r.acc == pytest.approx((pred == x["labels"]).float().mean().item())
    assert r.top5 == 1.0  # 3 classes: the true class is always in the top 5


def test_non_finite_loss_stops_before_the_step(tiny_root):
    ds = ShardDataset(tiny_root, "train")
    model = create_model("fn-small", ds.num_classes, pretrained=False)
    with torch.no_grad():
        model.head.bias.fill_(float("inf"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, 1e-3, 1e-3, 0.0)
    with pytest.raises(NonFiniteLoss, match="at batch 0"):
        train_one_epoch(model, BatchLoader(ds, 8, prefetch=0), opt, nn.CrossEntropyLoss(), torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k)

"""The training loop's pieces: optimiser groups, evaluation metrics, NaN guard."""

import math

import pytest
import torch
import torch.nn as nn

from fgvc.data.dataset import BatchLoader, ShardDataset
from fgvc.models import create_model
from fgvc.training.loop import (
    NonFiniteLoss,
    build_optimizer,
    evaluate,
    group_lrs,
    result_from_confusion,
    train_one_epoch,
)


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
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()
               if "running" not in k and "num_batches" not in k)


def test_evaluation_sums_equal_per_batch_python_sums(tiny_root):
    import torch.nn.functional as F

    ds = ShardDataset(tiny_root, "val")
    model = create_model("fn-small", ds.num_classes, pretrained=False).eval()
    loader = BatchLoader(ds, 5, prefetch=0)
    r = evaluate(model, loader, ds.num_classes, torch.device("cpu"))
    loss_sum = 0.0
    with torch.no_grad():
        for b in loader:
            loss_sum += F.cross_entropy(model(b.images), b.labels, reduction="sum").item()
    assert r.loss == loss_sum / 12  # summed in float64, in batch order: exactly


class NaNOnCall(nn.Module):
    """Cross-entropy whose `bad_call`-th call (0-based) returns NaN."""

    def __init__(self, bad_call: int):
        super().__init__()
        self.calls, self.bad_call = 0, bad_call

    def forward(self, logits, labels):
        loss = nn.functional.cross_entropy(logits, labels)
        self.calls += 1
        return loss * float("nan") if self.calls - 1 == self.bad_call else loss


def test_a_nan_in_a_later_batch_stops_before_that_step_and_after_the_good_ones(tiny_root):
    ds = ShardDataset(tiny_root, "train")

    def run(criterion, batches=None):
        torch.manual_seed(0)
        model = create_model("fn-small", ds.num_classes, pretrained=False)
        opt = build_optimizer(model, 1e-3, 1e-3, 0.0)
        loader = BatchLoader(ds, 8, shuffle=True, seed=1, prefetch=0)
        if batches is not None:  # the same first batches, and nothing after them
            loader._batch_positions = lambda full=loader._batch_positions: full()[:batches]
        try:
            train_one_epoch(model, loader, opt, criterion, torch.device("cpu"))
        except NonFiniteLoss as e:
            return model, opt, str(e)
        return model, opt, None

    model, opt, error = run(NaNOnCall(bad_call=2))
    assert error is not None and "training loss is nan at batch 2" in error
    assert {s["step"].item() for s in opt.state.values()} == {2.0}  # two steps taken, not the third
    clean, _, clean_error = run(nn.CrossEntropyLoss(), batches=2)
    assert clean_error is None
    for (name, a), b in zip(model.named_parameters(), clean.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_same_seed_same_epoch_bit_for_bit_whatever_the_loader_threads(tiny_root):
    from fgvc.training.augment import get_preset

    ds = ShardDataset(tiny_root, "train")
    results = []
    for workers in (0, 2, 0):
        torch.manual_seed(0)
        model = create_model("fn-small", ds.num_classes, pretrained=False)
        opt = build_optimizer(model, 1e-3, 1e-3, 0.01)
        loader = BatchLoader(ds, 8, shuffle=True, seed=3, transform=get_preset("heavy"), workers=workers)
        stats = [train_one_epoch(model, loader, opt, nn.CrossEntropyLoss(label_smoothing=0.1), torch.device("cpu"))
                 for loader.epoch in (0, 1)]
        results.append(([(s["loss"], s["acc"], s["images"]) for s in stats],
                        [p.detach().clone() for p in model.parameters()]))
    for metrics, params in results[1:]:
        assert metrics == results[0][0]
        assert all(torch.equal(a, b) for a, b in zip(params, results[0][1], strict=True))


def test_auto_loader_threads_none_on_a_cpu_two_beside_a_gpu_and_explicit_counts_kept(tiny_root):
    from fgvc.distributed import World
    from fgvc.training.config import TrainConfig
    from fgvc.training.session import TrainingData, build_session, loader_workers

    auto = TrainConfig(arch="fn-small", data_root=str(tiny_root))
    assert loader_workers(auto, torch.device("cpu")) == 0
    assert loader_workers(auto, torch.device("cuda")) == 2
    assert loader_workers(TrainConfig(arch="fn-small", num_workers=3), torch.device("cpu")) == 3
    assert loader_workers(TrainConfig(arch="fn-small", num_workers=0), torch.device("cuda")) == 0
    session = build_session(TrainConfig(arch="fn-small", data_root=str(tiny_root), aug="heavy", batch_size=8),
                            TrainingData.of(tiny_root), World())
    assert session.train_loader.workers == session.val_loader.workers == 0
    assert session.train_loader.transform is not None and not session.train_loader.augment_on_device


# --- the GPU benchmark, without a GPU -----------------------------------------------------------

@pytest.mark.slow  # two Python starts of bench/gpu.py
def test_the_gpu_benchmark_refuses_without_cuda_and_its_dry_run_writes_every_figure(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    refused = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert "has none" in refused.stderr and "--dry-run" in refused.stderr
    out = tmp_path / "figures.json"
    dry = subprocess.run([sys.executable, str(script), "--dry-run", "--json", str(out)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["dry_run"] is True and figures["device"] == "CPU (dry run)"
    training = figures["training"]["resnet18"]
    assert set(training["figures"]) == {"raw step", "ours, aug on GPU", "ours, exact aug on GPU", "ours, aug on CPU",
                                        "original"}
    assert all(f["median_img_s"] > 0 for f in training["figures"].values())
    assert set(training["targets"]) == {"ours_gpu_aug/raw >= 0.9", "ours_gpu_aug/original >= 2.0"}
    assert set(figures["masking"]["figures"]) == {"raw", "original", "pipeline"}
    assert "target: [resnet18] ours (aug on GPU) / raw step >= 0.9" in dry.stdout
    assert set(figures["summary"]) == {"resnet18: loop / raw step", "resnet18: loop / original loop",
                                       "masking / raw DeepLabV3 forward"}
    assert figures["summary"]["resnet18: loop / original loop"]["target"] == 2.0


@pytest.mark.parametrize("budget, writes", [(0.0, 2), (1.0, 3)])
def test_checkpoints_are_written_on_a_time_budget_first_and_last_always(tiny_root, tmp_path, budget, writes):
    from fgvc.training import TrainConfig, train
    from fgvc.training.checkpoint import CheckpointWriter, read_checkpoint

    writer = CheckpointWriter(tmp_path / "ckpt", budget=budget)
    outcome = train(TrainConfig(arch="fn-small", data_root=str(tiny_root), epochs=3, batch_size=8, num_workers=0),
                    callbacks=[writer], progress=False)
    assert writer.writes == writes
    last, best = read_checkpoint(writer.path("last")), read_checkpoint(writer.path("best"))
    assert last["epoch"] == 3 and last["best"]["epoch"] == best["epoch"] == outcome.best["epoch"]


def test_evaluation_counts_without_bincount(tiny_root, monkeypatch):
    """bincount sizes its output from the data: on a GPU a host sync per batch."""
    ds = ShardDataset(tiny_root, "val")
    model = create_model("fn-small", ds.num_classes, pretrained=False).eval()
    expected = evaluate(model, BatchLoader(ds, 5, prefetch=0), ds.num_classes, torch.device("cpu"))
    monkeypatch.setattr(torch, "bincount", lambda *a, **k: pytest.fail("bincount in evaluation"))
    r = evaluate(model, BatchLoader(ds, 5, prefetch=0), ds.num_classes, torch.device("cpu"))
    assert torch.equal(r.confusion, expected.confusion) and r.images == 12


def test_on_a_gpu_the_host_looks_at_the_loss_every_few_steps_and_names_the_first_bad_one(tiny_root, monkeypatch):
    from fgvc.training import loop

    ds = ShardDataset(tiny_root, "train")
    looks = []
    real = loop.distributed.all_ranks_true
    monkeypatch.setattr(loop.distributed, "all_ranks_true", lambda flag: looks.append(1) or real(flag))
    monkeypatch.setattr(loop, "nonfinite_check_interval", lambda device: 3)  # a GPU's interval, shortened
    model = create_model("fn-small", ds.num_classes, pretrained=False)
    opt = build_optimizer(model, 1e-3, 1e-3, 0.0)
    loader = BatchLoader(ds, 3, prefetch=0)  # 24 images: 8 steps
    train_one_epoch(model, loader, opt, nn.CrossEntropyLoss(), torch.device("cpu"))
    assert len(looks) == 3  # after steps 2, 5 and the last (7), not 8 times
    looks.clear()
    with pytest.raises(NonFiniteLoss, match="training loss is nan at batch 1;"):
        train_one_epoch(model, loader, opt, NaNOnCall(bad_call=1), torch.device("cpu"))
    assert len(looks) == 1  # found at the first look, step 2


def test_buffers_are_broadcast_once_per_dtype(monkeypatch):
    from fgvc.training import ddp

    model = create_model("resnet18", 3, pretrained=False)
    calls = []

    def broadcast(tensor, src):
        calls.append((tensor.dtype, tensor.numel(), src))
        tensor.fill_(7)  # what rank 0 sent

    monkeypatch.setattr(ddp, "is_initialized", lambda: True)
    monkeypatch.setattr(ddp, "collective_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ddp.dist, "broadcast", broadcast)
    ddp.broadcast_buffers(model)
    buffers = list(model.buffers())
    assert len(buffers) > 50 and {c[0] for c in calls} == {b.dtype for b in buffers}
    assert len(calls) == len({b.dtype for b in buffers}) == 2
    assert sum(c[1] for c in calls) == sum(b.numel() for b in buffers)
    assert all(bool((b == 7).all()) for b in buffers)

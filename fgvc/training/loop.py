"""The training loop, in the shape of torchvision's reference script:
build the optimiser and schedule, then `for epoch: train_one_epoch(); evaluate(); on_epoch_end()`.

Nothing here talks to MLflow: the caller gets one `EpochRecord` per epoch through a callback
and decides what to log and where to keep checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from fgvc import distributed
from fgvc.data.dataset import BatchLoader
from fgvc.errors import FgvcError
from fgvc.models.net import FGVCNet
from fgvc.training import ddp


class NonFiniteLoss(FgvcError):
    """The training loss became NaN or infinite (a user can lower the learning rate)."""


@dataclass(frozen=True)
class Precision:
    """How the model runs on the device: autocast dtype (None = fp32) and memory format."""

    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    @staticmethod
    def for_device(device: torch.device, amp: bool | None = None, channels_last: bool | None = None
                   ) -> Precision:
        """AMP and channels-last pay off on CUDA; None (auto) turns them on there only."""
        cuda = device.type == "cuda"
        use_amp = cuda if amp is None else amp
        dtype = None
        if use_amp:
            # native bfloat16 only: emulated bfloat16 (pre-Ampere GPUs) is slower than float16
            dtype = torch.bfloat16 if (not cuda or torch.cuda.is_bf16_supported(including_emulation=False)) \
                else torch.float16
        return Precision(dtype, cuda if channels_last is None else channels_last)

    @property
    def amp_name(self) -> str:
        """``off``, ``bfloat16`` or ``float16``: how it is logged and part of the identity."""
        return str(self.amp_dtype).replace("torch.", "") if self.amp_dtype is not None else "off"

    def autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.amp_dtype)


FP32 = Precision()  # no autocast, contiguous memory: the loop functions' default


def build_optimizer(model: FGVCNet, lr_backbone: float, lr_head: float, weight_decay: float
                    ) -> torch.optim.AdamW:
    """AdamW with separate learning rates for the backbone and the head (group order fixed:
    0 = backbone, 1 = head). Norm and bias parameters get no weight decay."""
    groups = []
    for parameters, lr in ((model.backbone_parameters(), lr_backbone), (model.head_parameters(), lr_head)):
        params = [p for p in parameters if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups)


def group_lrs(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(backbone lr, head lr) of an optimiser made by `build_optimizer`."""
    return optimizer.param_groups[0]["lr"], optimizer.param_groups[2]["lr"]


@dataclass
class EvalResult:
    loss: float
    acc: float
    top5: float
    balanced_acc: float
    per_class_acc: list[float]  # NaN for a class absent from the split
    confusion: torch.Tensor  # int64 [C, C], rows = true class, cols = predicted
    images: int


def evaluate(model: nn.Module, loader: BatchLoader, num_classes: int, device: torch.device,
             precision: Precision = FP32, progress: bool = False) -> EvalResult:
    """Plain cross-entropy, top-1, top-5, balanced accuracy, per-class accuracy, confusion."""
    return result_from_confusion(*_evaluation_sums(model, loader, num_classes, device, precision, progress))


def evaluate_sharded(model: nn.Module, loader: BatchLoader, num_classes: int, device: torch.device,
                     precision: Precision = FP32, progress: bool = False) -> EvalResult:
    """`evaluate` under DDP: each rank evaluates its share of the split (`loader` built with
    this rank's rank/world_size, no shuffle: rank r takes positions r, r+W, ...), and the
    confusion matrix, loss sum and top-5 hits are summed across ranks, so the metrics cover
    the whole split exactly once. Every rank gets the same result."""
    module = ddp.unwrap(model)  # no DDP forward: its buffer sync is a collective per call
    ddp.broadcast_buffers(module)
    confusion, loss_sum, top5_hits = _evaluation_sums(module, loader, num_classes, device, precision,
                                                      progress)
    totals = distributed.all_reduce_sum(torch.tensor([loss_sum, float(top5_hits)], dtype=torch.float64))
    confusion = distributed.all_reduce_sum(confusion)
    result = result_from_confusion(confusion, float(totals[0]), int(round(float(totals[1]))))
    if result.images != len(loader.dataset):
        raise RuntimeError(f"evaluation covered {result.images} images across ranks, but the split has "
                           f"{len(loader.dataset)} (each rank's loader must take its own share)")
    return result


def _evaluation_sums(model: nn.Module, loader: BatchLoader, num_classes: int, device: torch.device,
                     precision: Precision, progress: bool) -> tuple[torch.Tensor, float, int]:
    """(confusion int64 [C, C], summed cross-entropy, top-5 hits) over the loader's batches.

    The sums stay on the device until the end (one synchronisation per evaluation, not three
    per batch); the loss is summed in float64 in batch order, as a Python float would be."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top5_hits = torch.zeros((), dtype=torch.int64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    ones = torch.ones(loader.batch_size, dtype=torch.int64, device=device)  # counts added per cell
    k = min(5, num_classes)
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc="val", leave=False, disable=bars_off(progress)):
                with precision.autocast(device):
                    logits = model(batch.images)
                logits = logits.float()
                loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum").double()
                top5_hits += (logits.topk(k, dim=1).indices == batch.labels[:, None]).any(1).sum()
                # index_add_, not bincount: bincount sizes its output from the data (a host sync)
                cells = batch.labels * num_classes + logits.argmax(1)
                confusion.index_add_(0, cells, ones[:len(cells)])
    finally:
        model.train(was_training)
    return confusion.view(num_classes, num_classes).cpu(), float(loss_sum), int(top5_hits)


def result_from_confusion(confusion: torch.Tensor, loss_sum: float, top5_hits: int) -> EvalResult:
    """Metrics from summed statistics (also used after gathering them across processes)."""
    n = int(confusion.sum())
    support = confusion.sum(1)
    correct = confusion.diag()
    per_class = [(c / s) if s else float("nan") for c, s in zip(correct.tolist(), support.tolist(), strict=True)]
    present = [a for a in per_class if not math.isnan(a)]
    return EvalResult(
        loss=loss_sum / max(n, 1), acc=int(correct.sum()) / max(n, 1), top5=top5_hits / max(n, 1),
        balanced_acc=sum(present) / max(len(present), 1), per_class_acc=per_class,
        confusion=confusion, images=n,
    )


def train_one_epoch(model: nn.Module, loader: BatchLoader, optimizer: torch.optim.Optimizer,
                    criterion: nn.Module, device: torch.device, precision: Precision = FP32,
                    grad_clip: float = 0.0, scaler: torch.amp.GradScaler | None = None,
                    progress: bool = False, desc: str = "train") -> dict:
    """One pass over the training loader. Raises NonFiniteLoss on a bad loss (see below when).

    The loss is checked at every step on the CPU and every NONFINITE_CHECK_STEPS steps on a
    GPU (no host sync per step), always before the epoch ends. Under DDP the ranks check
    together (one rank's NaN stops all of them), and the returned loss, accuracy and image
    count are those of all ranks together; `seconds` is the slowest rank's.
    """
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    # The first step whose loss was not finite, and that loss, kept on the device; the host
    # looks (and under DDP the ranks agree) every `every` steps and after the last one.
    bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    bad_loss = torch.zeros((), device=device)
    every = nonfinite_check_interval(device)
    last_step = len(loader) - 1
    n = 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=bars_off(progress))
    for step, batch in enumerate(bar):
        with precision.autocast(device):
            logits = model(batch.images)
            loss = criterion(logits.float(), batch.labels)
        first_bad = ~torch.isfinite(loss.detach()) & (bad_step < 0)
        bad_step = torch.where(first_bad, step, bad_step)
        bad_loss = torch.where(first_bad, loss.detach(), bad_loss)
        if (step % every == every - 1 or step >= last_step) and not distributed.all_ranks_true(bad_step < 0):
            raise _nonfinite(int(bad_step), float(bad_loss), float(loss.detach()), step)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        b = len(batch.labels)
        loss_sum += loss.detach() * b
        correct += (logits.detach().argmax(1) == batch.labels).sum()
        n += b
        if not bar.disable and step % max(10, every) == 0:  # reading the sums waits for the device
            bar.set_postfix(loss=f"{loss_sum.item() / n:.3f}", acc=f"{correct.item() / n:.3f}")
    seconds = time.perf_counter() - start
    if distributed.is_initialized():
        images = torch.tensor(float(n), dtype=torch.float64, device=device)
        totals = distributed.all_reduce_sum(torch.stack([loss_sum.double(), correct.double(), images]))
        loss_sum, correct, n = totals[0], totals[1], int(totals[2])
        seconds = float(distributed.all_reduce_max(torch.tensor(seconds, dtype=torch.float64)))
    return {"loss": loss_sum.item() / max(n, 1), "acc": correct.item() / max(n, 1),
            "images": n, "seconds": seconds}


# Steps between looks at the loss on a GPU: each look waits for the device (and under DDP is an
# all-reduce). A bad step is still found within this many steps and always before the epoch
# ends, so no checkpoint holds its weights. On the CPU the host computes the loss anyway, so it
# looks at every step, before the step is applied.
NONFINITE_CHECK_STEPS = 50


def nonfinite_check_interval(device: torch.device) -> int:
    return 1 if device.type == "cpu" else NONFINITE_CHECK_STEPS


def _nonfinite(bad_step: int, bad_loss: float, here: float, step: int) -> NonFiniteLoss:
    if bad_step < 0:
        return NonFiniteLoss(f"training loss is not finite on another rank (here {here:.4f}) at batch {step}; "
                             f"stopping (try a lower learning rate, or grad_clip)")
    return NonFiniteLoss(f"training loss is {bad_loss} at batch {bad_step}; stopping "
                         f"(try a lower learning rate, or grad_clip)")


@dataclass
class EpochRecord:
    epoch: int  # 1-based: epoch e has completed e passes over the training data
    train: dict
    val: EvalResult
    lr_backbone: float
    lr_head: float
    seconds: float
    is_best: bool
    history: list[dict] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """The per-epoch metric names of the MLflow conventions."""
        return {
            "train/loss": self.train["loss"], "train/acc": self.train["acc"],
            "val/loss": self.val.loss, "val/acc": self.val.acc, "val/top5": self.val.top5,
            "val/error": 1.0 - self.val.acc, "val/balanced_acc": self.val.balanced_acc,
            "lr/backbone": self.lr_backbone, "lr/head": self.lr_head,
            "time/epoch_s": self.seconds,
            "throughput/train_img_s": self.train["images"] / max(self.train["seconds"], 1e-9),
        }


def bars_off(progress: bool) -> bool | None:
    """tqdm's `disable`: off when not asked for, and (None) off when stderr is not a terminal,
    where a bar leaves escape residue in a log; the per-epoch line is printed either way."""
    return True if not progress else None


def fit(model: nn.Module, train_loader: BatchLoader, val_loader: BatchLoader,
        optimizer: torch.optim.Optimizer, scheduler, criterion: nn.Module, epochs: int,
        num_classes: int, device: torch.device, precision: Precision = FP32,
        grad_clip: float = 0.0, start_epoch: int = 0, history: list[dict] | None = None,
        on_epoch_end: Callable[[EpochRecord], None] | None = None, progress: bool = True,
        evaluate_fn: Callable[..., EvalResult] = evaluate) -> list[dict]:
    """Train epochs `start_epoch+1 .. epochs`; best = highest val accuracy (first wins ties).

    `history` holds one metrics dict per finished epoch (restored on resume).
    """
    history = list(history or [])
    best_acc = max((h["val/acc"] for h in history), default=-1.0)
    scaler = torch.amp.GradScaler("cuda") if precision.amp_dtype == torch.float16 else None
    epoch_bar = tqdm(range(start_epoch, epochs), desc="epochs", disable=bars_off(progress),
                     initial=start_epoch, total=epochs)
    for epoch in epoch_bar:
        start = time.perf_counter()
        train_loader.set_epoch(epoch)
        lr_backbone, lr_head = group_lrs(optimizer)
        train = train_one_epoch(model, train_loader, optimizer, criterion, device, precision,
                                grad_clip, scaler, progress, desc=f"epoch {epoch + 1}/{epochs}")
        val = evaluate_fn(model, val_loader, num_classes, device, precision, progress)
        scheduler.step()
        is_best = val.acc > best_acc
        best_acc = max(best_acc, val.acc)
        record = EpochRecord(epoch + 1, train, val, lr_backbone, lr_head,
                             time.perf_counter() - start, is_best)
        history.append({"epoch": epoch + 1, **record.metrics()})
        record.history = history
        if progress:
            epoch_bar.write(
                f"epoch {epoch + 1}/{epochs}  train loss {train['loss']:.4f} acc {train['acc']:.3f} | "
                f"val loss {val.loss:.4f} acc {val.acc:.3f} top5 {val.top5:.3f} "
                f"bal {val.balanced_acc:.3f} | {record.seconds:.1f}s" + ("  *best" if is_best else ""))
        if on_epoch_end is not None:
            on_epoch_end(record)
    return history

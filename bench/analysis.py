"""Throughput of the analysis methods against their reference implementations.

One randomly initialised torchvision resnet18 (50 classes), CPU, default thread count:

- Grad-CAM images/s vs pytorch-grad-cam ``GradCAM`` and vs a plain forward + backward;
- occlusion images/s vs Captum ``Occlusion`` at its best ``perturbations_per_eval``, and the
  rate at which occlusion evaluates occluded copies vs the model's plain inference rate at
  the same batch size;
- exact cosine top-k vs faiss ``IndexFlatIP``.

Contenders of one comparison are timed in turn within each repeat and the fastest run of
each is kept, so load that drifts during the run affects all of them alike.

Run: ``python bench/analysis.py`` (a few minutes on 2 cores); ``--images/--size`` and
``--occ-images/--occ-size`` shrink it.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import faiss
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import Occlusion as CaptumOcclusion
from pytorch_grad_cam import GradCAM as ReferenceGradCAM
from torch import nn

from fgvc.analysis import GradCAM, Occlusion, cosine_topk
from fgvc.analysis.occlusion import window_masks


class ResNet18(nn.Module):
    """resnet18 with the fgvc model interface (``feature_stage = layer4[-1]``)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=num_classes)
        self.feature_stage = self.net.layer4[-1]

    def forward_features(self, x):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return torch.flatten(n.avgpool(x), 1)

    def forward(self, x):
        return self.net.fc(self.forward_features(x))


def race(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest wall time (s) of each contender over ``repeats`` rounds; every round times
    all contenders one after the other. Warm-up is the caller's job."""
    best = {name: float("inf") for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def over_batches(images: torch.Tensor, batch: int, fn: Callable[[torch.Tensor], object]):
    def run():
        for start in range(0, len(images), batch):
            fn(images[start : start + batch])

    return run


def bench_gradcam(model, images, batch, repeats):
    """Images/s of fgvc Grad-CAM, pytorch-grad-cam and a plain forward + backward."""

    def plain_forward_backward(x):
        model.zero_grad(set_to_none=True)
        logits = model(x)
        logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()

    with ReferenceGradCAM(model=model, target_layers=[model.feature_stage]) as reference:
        steps = {
            "ours": lambda x: GradCAM(model).attribute(x),
            "pytorch-grad-cam": lambda x: reference(input_tensor=x, targets=None),
            "plain": plain_forward_backward,
        }
        for step in steps.values():
            step(images[:batch])
        times = race({k: over_batches(images, batch, f) for k, f in steps.items()}, repeats)
    model.zero_grad(set_to_none=True)
    return {name: len(images) / seconds for name, seconds in times.items()}


def bench_occlusion(model, images, window, stride, batch, captum_ppe, repeats):
    """Images/s of fgvc and Captum occlusion, and fgvc's forward rate vs plain inference."""
    ours = Occlusion(model, window=window, stride=stride, fill="zero", batch_size=batch)
    copies = len(images) * window_masks(*images.shape[-2:], window, stride).shape[0]
    # fgvc evaluates copies + unoccluded images in equal chunks of at most `batch`
    total = copies + len(images)
    chunk = -(-total // -(-total // batch))
    plain_batch = torch.rand(chunk, *images.shape[1:])
    with torch.inference_mode():
        targets = model(images).argmax(1)
    captum = CaptumOcclusion(model)

    def captum_run(ppe):
        return lambda: captum.attribute(
            images,
            sliding_window_shapes=(3, window, window),
            strides=(3, stride, stride),
            baselines=0.0,
            target=targets,
            perturbations_per_eval=ppe,
        )

    def plain():
        with torch.inference_mode():
            model(plain_batch)

    plain()
    ours.attribute(images[:1])
    contenders = {"ours": lambda: ours.attribute(images, targets), "plain": plain}
    contenders.update({f"captum ppe={p}": captum_run(p) for p in captum_ppe})
    times = race(contenders, repeats)
    return {
        "ours_img_s": len(images) / times["ours"],
        "captum_img_s": {p: len(images) / times[f"captum ppe={p}"] for p in captum_ppe},
        "windows": copies // len(images),
        # the unoccluded reference forward is part of the work done per image
        "copies_per_s": total / times["ours"],
        "plain_img_s": len(plain_batch) / times["plain"],
        "plain_batch": len(plain_batch),
    }


def bench_neighbors(n_ref, n_query, dim, k, repeats):
    """Seconds for fgvc cosine_topk and faiss IndexFlatIP (build + search), and the share
    of identical neighbour indices."""
    g = torch.Generator().manual_seed(0)
    reference = F.normalize(torch.randn(n_ref, dim, generator=g), dim=1)
    query = F.normalize(torch.randn(n_query, dim, generator=g), dim=1)
    ref_np, query_np = reference.numpy(), query.numpy()

    def faiss_search():
        index = faiss.IndexFlatIP(dim)
        index.add(ref_np)
        return index.search(query_np, k)

    _, ours_idx = cosine_topk(query, reference, k)
    _, faiss_idx = faiss_search()
    agree = float((ours_idx.numpy() == faiss_idx).mean())
    times = race({"ours": lambda: cosine_topk(query, reference, k), "faiss": faiss_search}, repeats)
    return times["ours"], times["faiss"], agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32, help="Grad-CAM images")
    parser.add_argument("--size", type=int, default=224, help="Grad-CAM image side (px)")
    parser.add_argument("--batch", type=int, default=16, help="Grad-CAM batch size")
    parser.add_argument("--occ-images", type=int, default=4)
    parser.add_argument("--occ-size", type=int, default=112, help="occlusion image side (px)")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--occ-batch", type=int, default=256, help="occluded copies per pass")
    parser.add_argument("--captum-ppe", default="1,8,36", help="perturbations_per_eval to try")
    parser.add_argument("--ref", type=int, default=20000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds; best is kept")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = ResNet18(num_classes=50).eval()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, resnet18 (50 classes), "
        f"best of {args.repeats}; load average at start {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows = []

    images = torch.rand(args.images, 3, args.size, args.size)
    cam = bench_gradcam(model, images, args.batch, args.repeats)
    ours, theirs, plain = cam["ours"], cam["pytorch-grad-cam"], cam["plain"]
    rows += [
        (f"Grad-CAM fgvc ({args.images}x{args.size}px, batch {args.batch})",
         f"{ours:.2f} img/s", "", ""),
        ("Grad-CAM pytorch-grad-cam", f"{theirs:.2f} img/s", f"{ours / theirs:.2f}x", ">= 1.5x"),
        ("plain forward+backward", f"{plain:.2f} img/s", f"{ours / plain:.2f}x", "(info)"),
    ]

    occ_images = torch.rand(args.occ_images, 3, args.occ_size, args.occ_size)
    ppe = [int(p) for p in args.captum_ppe.split(",")]
    occ = bench_occlusion(
        model, occ_images, args.window, args.stride, args.occ_batch, ppe, args.repeats
    )
    best_ppe = max(occ["captum_img_s"], key=occ["captum_img_s"].get)
    captum_best = occ["captum_img_s"][best_ppe]
    rows.append((
        f"occlusion fgvc ({args.occ_images}x{args.occ_size}px, w{args.window}/s{args.stride}, "
        f"{occ['windows']} windows, batch {args.occ_batch})",
        f"{occ['ours_img_s']:.3f} img/s", "", "",
    ))
    rows += [
        (f"  captum Occlusion ppe={p}", f"{rate:.3f} img/s", "", "")
        for p, rate in occ["captum_img_s"].items()
    ]
    rows += [
        (f"occlusion vs captum best (ppe={best_ppe})", f"{captum_best:.3f} img/s",
         f"{occ['ours_img_s'] / captum_best:.2f}x", ">= 2x"),
        (f"occluded copies/s vs plain inference (batch {occ['plain_batch']})",
         f"{occ['copies_per_s']:.1f} vs {occ['plain_img_s']:.1f}",
         f"{occ['copies_per_s'] / occ['plain_img_s']:.2f}", ">= 0.85"),
    ]

    ours_s, faiss_s, agree = bench_neighbors(args.ref, args.queries, args.dim, args.k, 3)
    rows += [
        (f"cosine_topk {args.queries} queries x {args.ref} refs x {args.dim}d, k={args.k}",
         f"{ours_s * 1e3:.0f} ms", "", ""),
        (f"faiss IndexFlatIP (same indices: {agree:.4f})", f"{faiss_s * 1e3:.0f} ms",
         f"{ours_s / faiss_s:.2f}x time", "<= 1.5x"),
    ]

    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>18}  {'ratio':>12}  target")
    for name, value, ratio, target in rows:
        print(f"{name:<{width}}  {value:>18}  {ratio:>12}  {target}")
    print(f"load average at end {os.getloadavg()[0]:.1f} (other processes share the CPUs)")


if __name__ == "__main__":
    main()

"""Speed of the analysis methods against their reference implementations.

Per architecture (randomly initialised fgvc models, 50 classes, runway-synth demo images):

- Grad-CAM vs pytorch-grad-cam ``GradCAM`` on the same layer (``model.feature_stage``);
- occlusion, exact and approximate, vs Captum ``Occlusion`` at its best
  ``perturbations_per_eval`` (chosen from a sweep during warm-up), window 32, stride 16,
  zero fill, predicted-class targets; with the agreement of the maps (exact vs Captum as a
  share of the map range, approx vs exact as per-image Pearson correlation) and the conv
  FLOP bound on what incremental inference can gain;

and exact cosine top-k (``fgvc.analysis.neighbors.cosine_topk``) vs faiss ``IndexFlatIP``.

Every comparison runs through ``bench/harness.py``: warm-up, interleaved rounds, medians
with spread, ratios per round. See ``bench/README.md`` for getting trustworthy figures.

    python bench/analysis.py            # the figures (several minutes on 2 cores)
    python bench/analysis.py --quick    # smoke run at small sizes, well under a minute
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import faiss
import torch
import torch.nn.functional as F
from captum.attr import Occlusion as CaptumOcclusion
from pytorch_grad_cam import GradCAM as ReferenceGradCAM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Contender, Machine, Timings, compare, report_target  # noqa: E402

from fgvc.analysis import GradCAM, Occlusion, cosine_topk  # noqa: E402
from fgvc.analysis.incremental import UnsupportedModel, flop_estimate  # noqa: E402
from fgvc.data.demo import (  # noqa: E402
    DemoConfig,
    designer_signatures,
    render_image,
    venue_backdrops,
)
from fgvc.models import create_model  # noqa: E402

TARGETS = {"gradcam": 3.0, "occlusion_exact": 3.0, "occlusion_approx": 10.0,
           "approx_correlation": 0.95, "exact_error": 1e-4, "neighbors_time": 1.5}


def runway_images(count: int, height: int, width: int) -> torch.Tensor:
    """``[count, 3, H, W]`` float demo runway photos (a figure on a venue backdrop)."""
    cfg = DemoConfig(height=height, width=width)
    designers, venues = designer_signatures(cfg), venue_backdrops(cfg)
    g = torch.Generator().manual_seed(0)
    shots = [render_image(cfg, designers[i % len(designers)], venues[(3 * i) % len(venues)], g)[0]
             for i in range(count)]
    return torch.stack(shots).float() / 255.0


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def bench_gradcam(model, images, batch, rounds, warmup) -> Timings:
    def over_batches(fn):
        def run():
            for start in range(0, len(images), batch):
                fn(images[start : start + batch])
        return run

    def reference(x):
        # hooks only while the reference runs: fgvc runs hooked models as written (slower)
        with ReferenceGradCAM(model=model, target_layers=[model.feature_stage]) as cam:
            return torch.from_numpy(cam(input_tensor=x, targets=None))

    ours = GradCAM(model)
    got = ours.attribute(images[:batch]).maps
    agreement = min(pearson(a, b) for a, b in zip(got, reference(images[:batch]), strict=True))
    print(f"  maps vs pytorch-grad-cam: min Pearson {agreement:.5f} "
          f"({'lowered network' if ours.fast_path else 'forward hook'})")
    timings = compare([
        Contender("fgvc GradCAM", over_batches(ours.attribute), len(images), "img"),
        Contender("pytorch-grad-cam", over_batches(reference), len(images), "img"),
    ], rounds=rounds, warmup=warmup)
    model.zero_grad(set_to_none=True)  # pytorch-grad-cam's full backward fills .grad
    return timings


def bench_occlusion(model, images, window, stride, ppe_sweep, rounds, warmup):
    """Timings of fgvc exact, fgvc approx and Captum at its best ppe, and map agreement."""
    with torch.inference_mode():
        targets = model(images).argmax(1)
    captum = CaptumOcclusion(model)

    def captum_run(ppe):
        return lambda: captum.attribute(
            images, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
            baselines=0.0, target=targets, perturbations_per_eval=ppe)

    # after one untimed run, the warm-up is the sweep for Captum's best perturbations_per_eval
    captum_run(ppe_sweep[0])()
    sweep = compare([Contender(f"captum ppe={p}", captum_run(p), len(images), "img")
                     for p in ppe_sweep], rounds=1, warmup=0)
    best = max(ppe_sweep, key=lambda p: sweep.rate(f"captum ppe={p}").median)
    print("  captum sweep (img/s): " + ", ".join(
        f"ppe={p}: {sweep.rate(f'captum ppe={p}').median:.3g}" for p in ppe_sweep)
        + f" -> best ppe={best}")
    exact = Occlusion(model, window=window, stride=stride)
    approx = Occlusion(model, window=window, stride=stride, mode="approx")
    with torch.inference_mode():
        reference = captum_run(best)()[:, 0]
    exact_result = exact.attribute(images, targets)
    approx_result = approx.attribute(images, targets)
    span = reference.amax(dim=(1, 2)) - reference.amin(dim=(1, 2))
    error = float(((exact_result.raw - reference).abs().amax(dim=(1, 2)) / span).max())
    correlation = min(pearson(a, b) for a, b in zip(approx_result.raw, exact_result.raw, strict=True))
    print(f"  exact engine: {exact_result.engine}; approx: {approx_result.approximation} "
          f"({approx_result.evaluated_fraction:.0%} of windows evaluated)")
    timings = compare([
        Contender("fgvc exact", lambda: exact.attribute(images, targets), len(images), "img"),
        Contender("fgvc approx", lambda: approx.attribute(images, targets), len(images), "img"),
        Contender(f"captum ppe={best}", captum_run(best), len(images), "img"),
    ], rounds=rounds, warmup=warmup)
    return timings, f"captum ppe={best}", error, correlation


def bench_neighbors(n_query, n_ref, dim, k, rounds, warmup):
    g = torch.Generator().manual_seed(0)
    reference = F.normalize(torch.randn(n_ref, dim, generator=g), dim=1)
    query = F.normalize(torch.randn(n_query, dim, generator=g), dim=1)
    ref_np, query_np = reference.numpy(), query.numpy()

    def faiss_search():
        index = faiss.IndexFlatIP(dim)
        index.add(ref_np)
        return index.search(query_np, k)

    same = float((cosine_topk(query, reference, k)[1].numpy() == faiss_search()[1]).mean())
    print(f"  same neighbour indices as faiss: {same:.4f}")
    return compare([
        Contender("fgvc cosine_topk", lambda: cosine_topk(query, reference, k), n_query, "query"),
        Contender("faiss IndexFlatIP", faiss_search, n_query, "query"),
    ], rounds=rounds, warmup=warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: small images, one round; figures not comparable")
    parser.add_argument("--archs", default="resnet18,fn-small")
    parser.add_argument("--height", type=int, default=224)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--cam-images", type=int, default=32)
    parser.add_argument("--cam-batch", type=int, default=16)
    parser.add_argument("--occ-images", type=int, default=2)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--captum-ppe", default="16,32,64,128",
                        help="perturbations_per_eval values swept for Captum")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--refs", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.height, args.width, args.cam_images, args.cam_batch = 112, 80, 4, 4
        args.occ_images, args.captum_ppe, args.rounds = 1, "16,32", 1
        args.queries, args.refs = 500, 5000
    size = (args.height, args.width)
    ppe_sweep = [int(p) for p in args.captum_ppe.split(",")]
    verdicts = []

    with Machine("bench/analysis.py" + (" --quick (smoke run: not a figure)" if args.quick else "")):
        for arch in args.archs.split(","):
            torch.manual_seed(0)
            model = create_model(arch, 50, pretrained=False, image_size=size).eval()
            print(f"\n{arch} (random init, 50 classes), {size[0]}x{size[1]} px")
            try:
                flops = flop_estimate(model, *size, args.window, args.stride)
                print(f"  conv MACs per occluded copy: full {flops['macs_full'] / 1e6:.0f}M, "
                      f"incremental {flops['macs_incremental'] / 1e6:.0f}M: at most "
                      f"{flops['gain']:.2f}x fewer")
            except UnsupportedModel as error:
                print(f"  no incremental inference for this model ({error})")

            print(f"Grad-CAM, {args.cam_images} images, batch {args.cam_batch}")
            images = runway_images(args.cam_images, *size)
            cam = bench_gradcam(model, images, args.cam_batch, args.rounds, args.warmup)
            cam.print()
            ratio = cam.ratio("fgvc GradCAM", "pytorch-grad-cam")
            verdicts.append((f"{arch} Grad-CAM vs pytorch-grad-cam", ratio, ">=",
                             TARGETS["gradcam"]))

            print(f"occlusion, {args.occ_images} images, window {args.window}, "
                  f"stride {args.stride}")
            images = runway_images(args.occ_images, *size)
            occ, captum, error, correlation = bench_occlusion(
                model, images, args.window, args.stride, ppe_sweep, args.rounds, args.warmup)
            occ.print()
            verdicts += [
                (f"{arch} occlusion exact vs {captum}", occ.ratio("fgvc exact", captum), ">=",
                 TARGETS["occlusion_exact"]),
                (f"{arch} occlusion exact max |error| / map range", error, "<=",
                 TARGETS["exact_error"]),
                (f"{arch} occlusion approx vs {captum}", occ.ratio("fgvc approx", captum), ">=",
                 TARGETS["occlusion_approx"]),
                (f"{arch} occlusion approx vs exact: min Pearson", correlation, ">=",
                 TARGETS["approx_correlation"]),
            ]

        print(f"\nneighbours: {args.queries} queries x {args.refs} references x {args.dim} "
              f"dims, k={args.k}")
        nn_timings = bench_neighbors(args.queries, args.refs, args.dim, args.k,
                                     max(args.rounds, 3), args.warmup)
        nn_timings.print()
        time_ratio = nn_timings.ratio("faiss IndexFlatIP", "fgvc cosine_topk")  # = our time / theirs
        verdicts.append(("cosine_topk time / faiss time", time_ratio, "<=",
                         TARGETS["neighbors_time"]))

        print()
        for label, value, relation, threshold in verdicts:
            if isinstance(value, float):
                report_target(label, value, relation, threshold)
            else:
                report_target(label, value.median, relation, threshold, value)


if __name__ == "__main__":
    main()

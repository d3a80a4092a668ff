"""The `fgvc` command line, shared by `fgvc ...` and the MLproject entry points.

Each command only parses its options and calls the tracking layer. Boolean options accept
`true`/`false` so that `mlflow run . -P aug=true` and `fgvc train --aug true` read the same.
"""

from __future__ import annotations

import logging
import sys

import click

from fgvc.data.demo import DemoConfig
from fgvc.training.config import TrainConfig


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "urllib3", "matplotlib", "PIL", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# Errors a user can fix: shown as one clear line (the run is already marked FAILED).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, RuntimeError)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            raise click.ClickException(f"{type(e).__name__}: {e}") from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """fgvc: designer-level fashion classification experiments, tracked in MLflow."""
    _setup_logging(verbose)


@main.command()
@click.option("--source", default="demo", help="'demo' (synthetic runway data) or a folder <designer>/*.jpg or a CSV path,label.")
@click.option("--root", default="data/demo", help="Dataset root to write.")
@click.option("--num-designers", default=DemoConfig.num_designers, help="Demo: number of designers (classes).")
@click.option("--train-per-class", default=DemoConfig.train_per_class, help="Demo: training images per designer.")
@click.option("--val-per-class", default=DemoConfig.val_per_class, help="Demo: validation images per designer.")
@click.option("--height", default=DemoConfig.height, help="Image height in pixels.")
@click.option("--width", default=DemoConfig.width, help="Image width in pixels.")
@click.option("--bg-correlation", default=DemoConfig.bg_correlation,
              help="Demo: probability that an image is shot at its designer's home venue (the planted shortcut).")
@click.option("--resize", type=click.Choice(["pad", "stretch", "center-crop"]), default="pad",
              help="Ingest: resize policy.")
@click.option("--val-fraction", default=0.2, help="Ingest: share of each designer's images for validation.")
@click.option("--seed", default=0)
@click.option("--overwrite", type=click.BOOL, default=False, help="Rebuild an existing root.")
def prepare(source, root, num_designers, train_per_class, val_per_class, height, width,
            bg_correlation, resize, val_fraction, seed, overwrite):
    """Build a dataset root: the demo runway data or an ingest of real images."""
    from fgvc.tracking.prepare_run import run_prepare

    demo = DemoConfig(num_designers=num_designers, train_per_class=train_per_class,
                      val_per_class=val_per_class, height=height, width=width,
                      bg_correlation=bg_correlation, seed=seed)
    if source == "demo":
        run_prepare(source, root, demo=demo, overwrite=overwrite)
    else:
        run_prepare(source, root, height=height, width=width, resize=resize,
                    val_fraction=val_fraction, seed=seed, overwrite=overwrite)


def _optional_int(value: str | None) -> int | None:
    return None if value in (None, "", "none", "None", "all") else int(float(value))


def _optional_float(value: str | None) -> float | None:
    return None if value in (None, "", "none", "None", "auto") else float(value)


@main.command()
@click.option("--src-root", default="data/demo", help="Dataset root to mask (only read).")
@click.option("--dst-root", default="data/demo-masked",
              help="Dataset root to write (same shard layout); must lie outside --src-root.")
@click.option("--segmenter", type=click.Choice(["deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large", "groundtruth"]),
              default="deeplabv3_resnet101",
              help="Person segmenter; 'groundtruth' uses the masks stored in the source (demo data).")
@click.option("--seg-weights", default="none",
              help="Segmenter weights file; none: the torch hub cache ($TORCH_HOME/hub/checkpoints); "
                   "random: randomly initialised (tests, benchmarks).")
@click.option("--min-person-ratio", default=0.005, type=float,
              help="Below this share of person pixels the image is kept unmasked (a fallback).")
@click.option("--seg-size", default=520, type=int, help="Shorter side of the segmenter input (pixels).")
@click.option("--batch-size", default=16, type=int)
@click.option("--device", default="auto", help="auto | cpu | cuda | cuda:N.")
@click.option("--workers", default=1, type=int, help="Processes on this machine (shards are dealt out).")
@click.option("--overwrite", type=click.BOOL, default=False, help="Replace a complete destination.")
def mask(src_root, dst_root, segmenter, seg_weights, min_person_ratio, seg_size, batch_size, device,
         workers, overwrite):
    """Remove backgrounds: write a person-masked copy of a dataset root (same shard format)."""
    from fgvc.tracking.mask_run import run_mask

    run_mask(src_root, dst_root, segmenter=segmenter,
             seg_weights=None if seg_weights in ("", "none", "None") else seg_weights,
             min_person_ratio=min_person_ratio, seg_size=seg_size, batch_size=batch_size,
             device=device, workers=workers, overwrite=overwrite)


@main.command()
@click.option("--arch", default=TrainConfig.arch,
              help="resnet18 | resnet34 | resnet50 | fn-small | fn-medium | timm:<name>.")
@click.option("--pretrained", default=TrainConfig.pretrained, help="auto | true | false | path to a weights file.")
@click.option("--data-root", default=TrainConfig.data_root, help="Dataset root (the demo data is generated on first use).")
@click.option("--aug", default=TrainConfig.aug, help="false | true (the heavy recipe).")
@click.option("--epochs", default=TrainConfig.epochs, type=int)
@click.option("--batch-size", default=TrainConfig.batch_size, type=int)
@click.option("--lr-head", default=TrainConfig.lr_head, type=float)
@click.option("--lr-backbone", default="auto", help="auto: 1e-4 (ResNet/timm) or lr_head (FashionNet).")
@click.option("--weight-decay", default="auto", help="auto: 0.05 (ResNet/timm) or 0.01 (FashionNet).")
@click.option("--label-smoothing", default=TrainConfig.label_smoothing, type=float)
@click.option("--seed", default="0", help="Random seed (same seed on the CPU gives the same metrics).")
@click.option("--train-count", default="all", help="Class-stratified training subset size (all: every image).")
@click.option("--val-count", default="all", help="Class-stratified validation subset size.")
@click.option("--num-workers", default=TrainConfig.num_workers, type=int, help="Background loader threads (0: none).")
@click.option("--device", default=TrainConfig.device, help="auto | cpu | cuda | cuda:N.")
@click.option("--amp", default=TrainConfig.amp, help="Mixed precision: auto (on for CUDA) | true | false.")
@click.option("--channels-last", default=TrainConfig.channels_last, help="auto (on for CUDA) | true | false.")
@click.option("--grad-clip", default=TrainConfig.grad_clip, type=float, help="Max gradient norm (0: off).")
@click.option("--resume", default="false", help="true (newest unfinished run of this config) | <run_id> | false.")
@click.option("--registered-model", default="auto", help="Registry name (auto: fgvc-<arch>); none: do not register.")
@click.option("--nproc", default="1",
              help="Data-parallel processes on this machine (>1: relaunches itself under torchrun; "
                   "batch-size stays the global batch).")
@click.option("--sync-bn", default="false", help="DDP: true synchronises BatchNorm statistics across processes.")
def train(arch, pretrained, data_root, aug, epochs, batch_size, lr_head, lr_backbone, weight_decay,
          label_smoothing, seed, train_count, val_count, num_workers, device, amp, channels_last,
          grad_clip, resume, registered_model, nproc, sync_bn):
    """Train one model on one data regime, tracked in MLflow and registered.

    Data-parallel: `--nproc N`, or `torchrun --nproc-per-node N -m fgvc.cli train ...`.
    """
    from fgvc.training import distributed

    nproc = int(float(nproc))
    if nproc > 1 and not distributed.launched_by_torchrun():
        ctx = click.get_current_context()
        argv = ["-v"] if logging.getLogger().isEnabledFor(logging.DEBUG) else []
        argv.append("train")
        for param in ctx.command.params:
            if param.name != "nproc" and isinstance(param, click.Option):
                argv += [param.opts[0], str(ctx.params[param.name])]
        distributed.exec_torchrun(nproc, argv)

    from fgvc.tracking.train_run import run_train

    cfg = TrainConfig(arch=arch, pretrained=pretrained, data_root=data_root, aug=aug, epochs=epochs,
                      batch_size=batch_size, lr_head=lr_head, lr_backbone=_optional_float(lr_backbone),
                      weight_decay=_optional_float(weight_decay), label_smoothing=label_smoothing,
                      seed=int(float(seed)), train_count=_optional_int(train_count),
                      val_count=_optional_int(val_count), num_workers=num_workers, device=device,
                      amp=amp, channels_last=channels_last, grad_clip=grad_clip)
    register = registered_model.lower() != "none"
    run_train(cfg, resume=resume, register=register,
              registered_model=None if registered_model.lower() in ("auto", "none") else registered_model,
              sync_bn=str(sync_bn).lower() == "true")


@main.command()
@click.option("--name", "name", default=None, help="Registered model (fgvc-<arch>).")
@click.option("--arch", default=None, help="Shortcut for --name fgvc-<arch>.")
@click.option("--metric", default="val_acc", help="Version tag to maximise (val_acc, val_balanced_acc).")
@click.option("--dataset-digest", default="any", help="Only versions trained on this dataset digest.")
@click.option("--version", default="best", help="An explicit version, or best (by --metric).")
@click.option("--alias", default="champion")
def promote(name, arch, metric, dataset_digest, version, alias):
    """Move the `champion` alias to the best version (or to an explicit one)."""
    from fgvc.tracking.registry import promote as promote_version, registered_name
    from fgvc.tracking.runs import configure_tracking

    if not name and not arch:
        raise click.UsageError("give --name fgvc-<arch> or --arch <arch>")
    configure_tracking()
    chosen = promote_version(name or registered_name(arch), metric=metric,
                             dataset_digest=None if dataset_digest in ("any", "") else dataset_digest,
                             version=None if version in ("best", "") else version, alias=alias)
    click.echo(f"{name or registered_name(arch)}@{alias} -> version {chosen}")


@main.command()
@click.option("--model", "model_uri", required=True,
              help="models:/<name>@<alias>, models:/<name>/<version> or <name>@<alias>.")
@click.option("--method", default="gradcam", help="gradcam | occlusion | neighbors | shortcut | all (comma lists allowed).")
@click.option("--data-root", default="auto", help="Dataset to analyse (auto: the one the model was trained on).")
@click.option("--mask-root", default="none", help="Masked root built from the same data, for person masks.")
@click.option("--split", default="val")
@click.option("--num-images", default=64, type=int, help="Images analysed (seeded, class-stratified).")
@click.option("--seed", default=0, type=int)
@click.option("--target", type=click.Choice(["predicted", "label"]), default="predicted", help="Class explained.")
@click.option("--batch-size", default=32, type=int)
@click.option("--window", default=32, type=int, help="Occlusion window side (pixels).")
@click.option("--stride", default=16, type=int, help="Occlusion stride (pixels).")
@click.option("--fill", type=click.Choice(["zero", "mean", "blur"]), default="zero", help="Occlusion fill.")
@click.option("--k", default=5, type=int, help="Neighbours per query.")
@click.option("--exclude-same-designer", type=click.BOOL, default=False,
              help="Neighbours: drop the query's own designer (which other designers look alike?).")
@click.option("--device", default="auto", help="auto | cpu | cuda.")
def analyze(model_uri, method, data_root, mask_root, split, num_images, seed, target, batch_size, window,
            stride, fill, k, exclude_same_designer, device):
    """Grad-CAM, occlusion, neighbours, shortcut test for a registered model; attached to its training run."""
    import torch

    from fgvc.tracking.analyze_run import run_analyze

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    run_analyze(model_uri, method, data_root=None if data_root == "auto" else data_root,
                mask_root=None if mask_root in ("none", "") else mask_root, device=device, split=split,
                num_images=num_images, seed=seed, target=target, batch_size=batch_size, window=window,
                stride=stride, fill=fill, k=k, exclude_same_designer=exclude_same_designer)


def _auto(value: str | None) -> str | None:
    return None if value is None or str(value).strip().lower() in ("", "auto") else str(value).strip()


def _auto_list(value: str | None, kind=str) -> tuple | None:
    text = _auto(value)
    return None if text is None else tuple(kind(v.strip()) for v in text.split(",") if v.strip())


def _auto_number(value: str | None, kind=int):
    text = _auto(value)
    if text is None:
        return None
    return int(float(text)) if kind is int else float(text)


@main.command()
@click.option("--preset", type=click.Choice(["quick", "full"]), default="quick",
              help="quick: fn-small, 4 regimes, 1 seed, small demo (minutes on a CPU); "
                   "full: resnet18,resnet34,fn-small,fn-medium x 4 regimes x 3 seeds, default demo.")
@click.option("--archs", default="auto", help="Comma list of architectures (auto: the preset's).")
@click.option("--regimes", default="auto", help="Comma list of unmasked, masked, unmasked+aug, masked+aug.")
@click.option("--seeds", default="auto", help="Comma list of seeds, e.g. 0,1,2.")
@click.option("--epochs", default="auto")
@click.option("--batch-size", default="auto")
@click.option("--lr-head", default=TrainConfig.lr_head, type=float)
@click.option("--pretrained", default="auto", help="auto | true | false, for every cell.")
@click.option("--data-root", default="auto",
              help="Source dataset root (auto: the preset's demo data, generated when missing).")
@click.option("--masked-root", default="auto", help="Background-removed root (auto: <data-root>-masked; built when missing).")
@click.option("--segmenter", default="auto",
              help="For building the masked root (auto: groundtruth when the source has person masks, "
                   "as the demo data does; else deeplabv3_resnet101).")
@click.option("--num-designers", default="auto", help="Demo data: designers (classes).")
@click.option("--train-per-class", default="auto", help="Demo data: training images per designer.")
@click.option("--val-per-class", default="auto", help="Demo data: validation images per designer.")
@click.option("--height", default="auto", help="Demo data: image height.")
@click.option("--width", default="auto", help="Demo data: image width.")
@click.option("--bg-correlation", default="auto", help="Demo data: strength of the planted background shortcut.")
@click.option("--num-images", default="auto", help="Validation images per analysis (the same for every cell).")
@click.option("--occlusion-window", default="auto", help="auto: a third of the shorter image side.")
@click.option("--occlusion-stride", default="auto", help="auto: half the window.")
@click.option("--device", default="auto", help="auto | cpu | cuda | cuda:N.")
@click.option("--num-workers", default=0, type=int, help="Background loader threads per training.")
@click.option("--registered-model", default="auto", help="Registry name for every cell (auto: fgvc-<arch>).")
def study(preset, archs, regimes, seeds, epochs, batch_size, lr_head, pretrained, data_root, masked_root,
          segmenter, num_designers, train_per_class, val_per_class, height, width, bg_correlation, num_images,
          occlusion_window, occlusion_stride, device, num_workers, registered_model):
    """The background-reliance study: every architecture x regime x seed trained, analysed, reported."""
    from fgvc.tracking.study_run import StudyConfig, run_study

    demo = dict(num_designers=_auto_number(num_designers), train_per_class=_auto_number(train_per_class),
                val_per_class=_auto_number(val_per_class), height=_auto_number(height),
                width=_auto_number(width), bg_correlation=_auto_number(bg_correlation, float))
    cfg = StudyConfig.from_preset(
        preset, demo=demo, archs=_auto_list(archs), regimes=_auto_list(regimes), seeds=_auto_list(seeds, int),
        epochs=_auto_number(epochs), batch_size=_auto_number(batch_size), lr_head=lr_head,
        pretrained=pretrained, data_root=_auto(data_root), masked_root=_auto(masked_root),
        segmenter=segmenter, num_images=_auto_number(num_images),
        occlusion_window=_auto_number(occlusion_window), occlusion_stride=_auto_number(occlusion_stride),
        device=device, num_workers=num_workers, registered_model=_auto(registered_model))
    result = run_study(cfg)
    click.echo(f"study run {result.run_id}: {len(result.cells)} cells in {result.seconds:.0f} s; "
               f"report at runs:/{result.run_id}/study/report.html")


def run(command: str, argv: list[str] | None = None) -> None:
    """Entry-point scripts: `fgvc <command> <argv>` with user errors shown without a traceback."""
    args = [command, *(sys.argv[1:] if argv is None else argv)]
    main.main(args=args, prog_name="fgvc", standalone_mode=True)


if __name__ == "__main__":
    main()

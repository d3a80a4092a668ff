"""The `fgvc` command line, shared by `fgvc ...` and the MLproject entry points.

Each command only parses its options and calls the tracking layer. Boolean options accept
`true`/`false` so that `mlflow run . -P aug=true` and `fgvc train --aug true` read the same.
"""

from __future__ import annotations

import logging
import sys

import click

from fgvc.data.demo import DemoConfig


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


def run(command: str, argv: list[str] | None = None) -> None:
    """Entry-point scripts: `fgvc <command> <argv>` with user errors shown without a traceback."""
    args = [command, *(sys.argv[1:] if argv is None else argv)]
    main.main(args=args, prog_name="fgvc", standalone_mode=True)


if __name__ == "__main__":
    main()

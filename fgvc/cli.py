"""The `fgvc` command line, shared by `fgvc ...` and the MLproject entry points.

Every command's options are generated from its typed config (fgvc.config): one click option per
field, parsed once by the field's kind (`--lr-backbone: 'abc' is not a number (or auto)`), with
the rendered default shown in `--help`. The command body builds the frozen config (its range
checks run there, before anything else) and calls the tracking layer. A user-fixable problem
(fgvc.errors.FgvcError) prints one line and exits 1; anything else keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from fgvc.config import Kind, cli_name, options
from fgvc.errors import FgvcError


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "urllib3", "matplotlib", "PIL", "git", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class KindType(click.ParamType):
    """A click type that parses with a config field's Kind."""

    def __init__(self, kind: Kind):
        self.kind = kind
        self.name = kind.name

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            return self.kind.parse(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def config_options(cls):
    """Decorator: one option per field of the config dataclass `cls`."""
    def decorate(command):
        for field in reversed(options(cls)):
            kind = field.metadata["kind"]
            command = click.option(cli_name(field.name), field.name, type=KindType(kind),
                                   default=kind.render(field.default), show_default=True,
                                   help=field.metadata["help"])(command)
        return command
    return decorate


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FgvcError as e:
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            raise click.ClickException(str(e).splitlines()[0] if str(e).strip() else type(e).__name__) from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--verbose", "-v", is_flag=True, help="Debug logging (and tracebacks for every error).")
def main(verbose: bool) -> None:
    """fgvc: designer-level fashion classification experiments, tracked in MLflow."""
    _setup_logging(verbose)


def _relaunch_under_torchrun(cfg, processes: int, command: str, skip: str) -> None:
    """Run this command again in `processes` processes under torchrun (DDP, shared shards)."""
    from fgvc import distributed

    argv = (["-v"] if logging.getLogger().isEnabledFor(logging.DEBUG) else []) + [command]
    for name, text in cfg.params().items():
        if name != skip:
            argv += [cli_name(name), text]
    distributed.exec_torchrun(processes, argv)


from fgvc.analysis.config import AnalyzeConfig  # noqa: E402  (after click: the options read them)
from fgvc.data.config import PrepareConfig  # noqa: E402
from fgvc.masking.config import MaskConfig  # noqa: E402
from fgvc.study.config import StudyConfig  # noqa: E402
from fgvc.tracking.registry import PromoteConfig  # noqa: E402
from fgvc.training.config import TrainConfig  # noqa: E402
from fgvc.training.imported import RegisterConfig  # noqa: E402

CONFIGS = {"prepare": PrepareConfig, "mask": MaskConfig, "train": TrainConfig, "promote": PromoteConfig,
           "analyze": AnalyzeConfig, "register": RegisterConfig, "study": StudyConfig}


@main.command()
@config_options(PrepareConfig)
def prepare(**values):
    """Build a dataset root: the demo runway data or an ingest of real images."""
    from fgvc.tracking.prepare_run import run_prepare

    meta = run_prepare(PrepareConfig(**values))
    click.echo(f"{values['root']}: {meta.get('counts')} (digest {meta['digest']})")


@main.command()
@config_options(MaskConfig)
def mask(**values):
    """Remove backgrounds: write a person-masked copy of a dataset root (same shard format)."""
    from fgvc import distributed
    from fgvc.tracking.mask_run import run_mask

    cfg = MaskConfig(**values)
    if cfg.workers > 1 and not distributed.launched_by_torchrun():
        _relaunch_under_torchrun(cfg, cfg.workers, "mask", skip="workers")
    run_mask(cfg)


@main.command()
@config_options(TrainConfig)
def train(**values):
    """Train one model on one data regime, tracked in MLflow and registered.

    Data-parallel: `--nproc N`, or `torchrun --nproc-per-node N -m fgvc.cli train ...`.
    """
    from fgvc import distributed
    from fgvc.tracking.train_run import run_train

    cfg = TrainConfig(**values)
    if cfg.nproc > 1 and not distributed.launched_by_torchrun():
        _relaunch_under_torchrun(cfg, cfg.nproc, "train", skip="nproc")
    result = run_train(cfg)
    if result is not None:
        click.echo(f"run {result.run_id}: best val acc {result.best_val_acc:.4f} at epoch {result.best_epoch}"
                   + (f"; registered models:/{result.registered_model}/{result.model_version}"
                      if result.model_version else ""))


@main.command()
@config_options(PromoteConfig)
def promote(**values):
    """Move the `champion` alias to the best version of one dataset (or to an explicit one)."""
    from fgvc.tracking.promote_run import run_promote

    click.echo(run_promote(PromoteConfig(**values)).describe())


@main.command()
@config_options(AnalyzeConfig)
def analyze(**values):
    """Grad-CAM, occlusion, neighbours, background swaps for a registered model: records keyed
    by their settings, shown on its training run."""
    from fgvc.tracking.analyze_run import describe_outcome, run_analyze

    outcome = run_analyze(AnalyzeConfig(**values))
    click.echo(describe_outcome(outcome))


@main.command()
@config_options(RegisterConfig)
def register(**values):
    """Register a checkpoint of the original scripts (ResNet-18/34/50, FashionNet-Small/Medium)."""
    from fgvc.tracking.register_run import run_register

    run_id, name, version = run_register(RegisterConfig(**values))
    click.echo(f"run {run_id}: registered models:/{name}/{version} (alias candidate)")


@main.command()
@config_options(StudyConfig)
def study(**values):
    """The background-reliance study: every architecture x regime x seed trained, analysed, reported."""
    from fgvc.tracking.study_report import terminal_summary
    from fgvc.tracking.study_run import run_study

    result = run_study(StudyConfig(**values))
    click.echo(terminal_summary(result))


def run(command: str, argv: list[str] | None = None) -> None:
    """Entry-point scripts: `fgvc <command> <argv>`."""
    main.main(args=[command, *(sys.argv[1:] if argv is None else argv)], prog_name="fgvc", standalone_mode=True)


if __name__ == "__main__":
    main()

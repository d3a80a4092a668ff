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
import re
import sys
import warnings

import click

from fgvc.analysis.config import AnalyzeConfig
from fgvc.config import Kind, cli_name, options
from fgvc.data.config import PredictConfig, PrepareConfig
from fgvc.errors import FgvcError
from fgvc.masking.config import MaskConfig
from fgvc.study.config import StudyConfig
from fgvc.tasks.promote_config import PromoteConfig
from fgvc.training.config import RegisterConfig, TrainConfig

# Nothing above imports torch or MLflow (tests/test_cli.py checks it): `--help`, a typo or a
# refused option answer at once; each command imports what it runs inside its body.

_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _warning_as_log_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning as one log line: its category and text, without source lines or the
    terminal colour codes some libraries put in the text."""
    text = " ".join(_ESCAPES.sub("", str(message)).split())
    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, text)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "urllib3", "matplotlib", "PIL", "git", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not verbose:
        warnings.showwarning = _warning_as_log_line


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
        except Exception as error:
            e = _one_line(error)
            if e is None or logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            raise click.ClickException(str(e).splitlines()[0] if str(e).strip() else type(e).__name__) from e


def _one_line(error: Exception) -> FgvcError | None:
    """A user-fixable error, or what a refused or unreachable tracking server, or a failed
    write, becomes (one line); None for a bug."""
    if isinstance(error, FgvcError):
        return error
    if isinstance(error, (click.ClickException, click.exceptions.Exit, click.Abort)):
        return None  # click's own: usage errors, --help, Ctrl-C
    if "mlflow" not in sys.modules and not isinstance(error, OSError):
        return None  # nothing tracked yet, nothing written: a bug
    from fgvc.files import write_failed
    from fgvc.tracking.failures import translated

    return translated(error) or write_failed(error)


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
    distributed.exec_torchrun(processes, argv, getattr(cfg, "device", None))


CONFIGS = {"prepare": PrepareConfig, "mask": MaskConfig, "train": TrainConfig, "promote": PromoteConfig,
           "analyze": AnalyzeConfig, "register": RegisterConfig, "study": StudyConfig,
           "predict": PredictConfig}


@main.command()
@config_options(PrepareConfig)
def prepare(**values):
    """Build a dataset root: the demo runway data or an ingest of real images."""
    cfg = PrepareConfig(**values)  # refused options answer before the heavy imports
    from fgvc.tasks.prepare import check_root, describe_split, run_prepare

    if cfg.check is not None:
        clean, line = check_root(cfg.check)
        click.echo(line)
        sys.exit(0 if clean else 1)
    meta = run_prepare(cfg)
    click.echo(f"{values['root']}: {meta.get('counts')} (digest {meta['digest']}). {describe_split(meta)}")


@main.command()
@config_options(MaskConfig)
def mask(**values):
    """Remove backgrounds: write a person-masked copy of a dataset root (same shard format)."""
    cfg = MaskConfig(**values)
    from fgvc import distributed
    from fgvc.tasks.mask import run_mask

    if cfg.workers > 1 and not distributed.launched_by_torchrun():
        _relaunch_under_torchrun(cfg, cfg.workers, "mask", skip="workers")
    run_mask(cfg)


@main.command()
@config_options(TrainConfig)
def train(**values):
    """Train one model on one data regime, tracked in MLflow and registered.

    Data-parallel: `--nproc N`, or `torchrun --nproc-per-node N -m fgvc.cli train ...`.
    """
    cfg = TrainConfig(**values)
    from fgvc import distributed
    from fgvc.tasks.train import run_train

    if cfg.nproc > 1 and not distributed.launched_by_torchrun():
        _relaunch_under_torchrun(cfg, cfg.nproc, "train", skip="nproc")
    result = run_train(cfg)
    if result is not None:
        from fgvc.tracking.runs import run_link

        link = run_link(result.run_id)
        click.echo(f"run {result.run_id}: best val acc {result.best_val_acc:.4f} at epoch {result.best_epoch}"
                   + (f"; registered models:/{result.registered_model}/{result.model_version} (alias candidate)"
                      if result.model_version else "") + (f"; {link}" if link else ""))


@main.command()
@config_options(PromoteConfig)
def promote(**values):
    """Move the `champion` alias to the best version of one dataset (or to an explicit one)."""
    cfg = PromoteConfig(**values)
    from fgvc.tasks.promote import run_promote

    click.echo(run_promote(cfg).describe())


@main.command()
@config_options(AnalyzeConfig)
def analyze(**values):
    """Grad-CAM, occlusion, neighbours, background swaps for a registered model: records keyed
    by their settings, shown on its training run."""
    cfg = AnalyzeConfig(**values)
    from fgvc.tasks.analyze import describe_outcome, run_analyze

    click.echo(describe_outcome(run_analyze(cfg)))


@main.command()
@config_options(RegisterConfig)
def register(**values):
    """Register a checkpoint of the original scripts (ResNet-18/34/50, FashionNet-Small/Medium)."""
    cfg = RegisterConfig(**values)
    from fgvc.tasks.register import run_register

    run_id, name, version = run_register(cfg)
    click.echo(f"run {run_id}: registered models:/{name}/{version} (alias candidate)")


class StudyCommand(click.Command):
    # What to do rather than how: these modes are not MLproject parameters (`mlflow run` makes a run of its own).
    command_line_only = ("list_cells", "cell", "collect")


@main.command(cls=StudyCommand)
@config_options(StudyConfig)
@click.option("--list-cells", is_flag=True, help="Print the study's cell keys, one a line, and exit.")
@click.option("--cell", "cell", default=None, metavar="KEY|INDEX",
              help="Run one cell (a key, or its 0-based index in --list-cells: a scheduler's array index).")
@click.option("--collect", is_flag=True, help="Train nothing: the table, figures and report from finished cells.")
def study(list_cells: bool, cell: str | None, collect: bool, **values):
    """The background-reliance study: every architecture x regime x seed trained, analysed, reported."""
    cfg = StudyConfig(**values)
    if list_cells:
        click.echo("\n".join(c.key for c in cfg.plan().cells()))
        return
    from fgvc.tasks.study import run_study, run_study_cell
    from fgvc.tasks.study_report import terminal_summary

    if cell is not None:
        done = run_study_cell(cfg, cell)
        click.echo(f"cell {done.cell.key}: {done.status} run {done.run_id} ({done.model_uri})")
        return
    click.echo(terminal_summary(run_study(cfg, collect=collect)))



@main.command()
@config_options(PredictConfig)
def predict(**values):
    """Designers for any photos (a folder or a CSV) from a registered model: a CSV, tracked."""
    cfg = PredictConfig(**values)
    from fgvc.tasks.predict import run_predict

    done = run_predict(cfg)
    click.echo(f"run {done['run_id']}: {done['rows']} photo(s) predicted by {done['model']} -> {done['out']}"
               + (f"; {len(done['unreadable'])} unreadable" + (
                   f" given {done['fallback_designer']!r} (listed in {done['unreadable_list']})"
                   if done["unreadable_list"] else " (listed)") if done["unreadable"] else ""))


def run(command: str, argv: list[str] | None = None) -> None:
    """Entry-point scripts: `fgvc <command> <argv>`."""
    main.main(args=[command, *(sys.argv[1:] if argv is None else argv)], prog_name="fgvc", standalone_mode=True)


if __name__ == "__main__":
    main()

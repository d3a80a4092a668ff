"""The command line answers at once: nothing heavy is imported before click has parsed."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "timm", "mlflow", "numpy", "fgvc.analysis.methods", "fgvc.models.architectures")


def test_importing_the_cli_imports_neither_torch_nor_mlflow():
    code = ("import sys, fgvc.cli; from fgvc.cli import CONFIGS; "
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("argv, expected", [
    (["--help"], "Commands:"),
    (["train", "--help"], "--arch"),
    (["train", "--arch", "resnt18"], "did you mean resnet18"),
    (["analyze", "--method", "gradcm"], "unknown analysis method 'gradcm'"),
    (["mask", "--segmenter", "groundtruht"], "did you mean groundtruth"),
])
def test_help_and_refusals_answer_without_heavy_imports(argv, expected):
    code = ("import sys\nfrom fgvc.cli import main\ntry:\n    main.main(args=sys.argv[1:], prog_name='fgvc')\n"
            "except SystemExit:\n    pass\n"
            f"print('HEAVY:' + ' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert expected in out.stdout + out.stderr
    assert out.stdout.strip().endswith("HEAVY:")


@pytest.mark.parametrize("name", ["ARCHS", "SEGMENTERS", "PRESETS", "METHODS"])
def test_declared_names_are_exactly_the_registered_ones(name):
    from fgvc import catalog

    registry = getattr(catalog, name)
    declared = registry.names()
    registry.load()
    assert [n for n, _ in registry.items()] == list(declared)


def test_a_registry_refuses_an_unknown_name_with_the_nearest_ones():
    from fgvc.catalog import ARCHS
    from fgvc.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown architecture 'resnet-18' \(did you mean resnet18"):
        ARCHS.get("resnet-18")
    assert importlib.import_module("fgvc.models").create_model  # the eager package still works


def test_a_python_warning_is_one_log_line_without_colour_codes(monkeypatch, caplog):
    import logging
    import warnings

    from fgvc import cli

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored afterwards
    cli._setup_logging(verbose=False)
    assert warnings.showwarning is cli._warning_as_log_line
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("\x1b[33mAdd type hints\n  to predict\x1b[0m", UserWarning, stacklevel=1)
    assert [r.getMessage() for r in caplog.records] == ["UserWarning: Add type hints to predict"]

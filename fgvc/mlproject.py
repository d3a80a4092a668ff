"""The MLproject file, generated from the task configs: `python -m fgvc.mlproject > MLproject`.

Every CLI option is an entry-point parameter of the same name, type and default, and every
parameter reaches the command; tests/test_mlproject.py checks the file against this.
"""

from __future__ import annotations

import yaml

from fgvc.cli import CONFIGS
from fgvc.config import cli_name, options

HEADER = """\
# Generated from the task configs by `python -m fgvc.mlproject > MLproject`; edit the configs, not this file.
# Run with `mlflow run . -e <entry point> --env-manager local -P name=value`.
"""


def _default(kind, value):
    text = kind.render(value)
    if kind.mlproject_type == "int":
        return int(text)
    if kind.mlproject_type == "float":
        return float(text)
    return text


def entry_points() -> dict:
    out = {}
    for name, cls in CONFIGS.items():
        fields = options(cls)
        params = {f.name: {"type": f.metadata["kind"].mlproject_type,
                           "default": _default(f.metadata["kind"], f.default)} for f in fields}
        command = " ".join([f"python entrypoints/{name}.py"] + [f"{cli_name(f.name)} {{{f.name}}}" for f in fields])
        out[name] = {"parameters": params, "command": command}
    return out


def render() -> str:
    project = {"name": "fgvc", "conda_env": "conda.yaml", "entry_points": entry_points()}
    return HEADER + yaml.safe_dump(project, sort_keys=False, width=120, default_flow_style=None)


if __name__ == "__main__":
    print(render(), end="")

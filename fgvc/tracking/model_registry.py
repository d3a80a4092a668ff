"""The model registry: resolution of `models:/name@alias` and `models:/name/version`, a
version's checkpoint, and loading a version back as an `nn.Module`.

Every filter string is built with :func:`literal`, so a name holding a quote can neither
break a lookup nor change the query; errors say what exists instead of a traceback.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fgvc.errors import ConfigError, FgvcError
from fgvc.models.predict import model_from_checkpoint
from fgvc.safeload import read_checkpoint
from fgvc.tracking.logged_model import CHECKPOINT_ARTIFACT
from fgvc.tracking.search import literal

log = logging.getLogger("fgvc")

def versions_of(name: str) -> list:
    return MlflowClient().search_model_versions(f"name = {literal(name)}")


def registered_names() -> str:
    return ", ".join(sorted(r.name for r in MlflowClient().search_registered_models())) or "(none)"


_URI = re.compile(r"^(?:models:/)?(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass
class ResolvedModel:
    name: str
    version: str
    run_id: str
    uri: str
    source: str
    tags: dict


def resolve_version(uri: str) -> ResolvedModel:
    """`models:/name@alias`, `models:/name/version` or `name@alias` -> the version and its run.

    Errors list what exists: the registered names for an unknown model, the aliases for an
    unknown alias, the versions for an unknown version.
    """
    m = _URI.match(uri.strip())
    if not m:
        raise ConfigError(f"--model {uri!r} not understood; use models:/<name>@<alias>, "
                          f"models:/<name>/<version> or <name>@<alias>")
    name, alias, number = m.group("name"), m.group("alias"), m.group("version")
    client = MlflowClient()
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        raise ConfigError(f"no registered model named {name!r}; registered models: {registered_names()}") from None
    if alias is not None:
        if alias not in registered.aliases:
            aliases = ", ".join(f"{a} (v{v})" for a, v in sorted(registered.aliases.items()))
            raise ConfigError(f"registered model {name!r} has no alias {alias!r}; aliases: {aliases or '(none)'}")
        number = str(registered.aliases[alias])
    try:
        version = client.get_model_version(name, number)
    except MlflowException:
        versions = sorted(int(v.version) for v in versions_of(name))
        raise ConfigError(f"registered model {name!r} has no version {number}; versions: {versions}") from None
    if not version.run_id:
        raise FgvcError(f"{name} version {number} has no source run, so its training cannot be found")
    if version.source is None:
        raise FgvcError(f"{name} version {number} has no source: its files cannot be found")
    return ResolvedModel(name, str(version.version), version.run_id, f"models:/{name}/{version.version}",
                         version.source, dict(version.tags))


def download_checkpoint(resolved: ResolvedModel, dst: str | Path | None = None) -> Path:
    """The version's checkpoint file (state_dict + spec), from its MLflow model's artifacts
    (or, for versions registered from a run's checkpoints folder, that folder's best.pt)."""
    dst = str(dst or tempfile.mkdtemp(prefix="fgvc-model-"))
    try:
        if resolved.source.startswith("runs:/"):
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{resolved.source}/best.pt", dst_path=dst))
        mlmodel = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"{resolved.uri}/MLmodel", dst_path=dst)).read_text())
        relative = mlmodel["flavors"]["python_function"]["artifacts"][CHECKPOINT_ARTIFACT]["path"]
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{resolved.uri}/{relative}", dst_path=dst))
    except (MlflowException, OSError, KeyError, TypeError) as e:
        raise FgvcError(f"{resolved.uri}: its checkpoint cannot be fetched ({str(e).splitlines()[0]})") from None


def load_model(uri: str, device: str | torch.device = "cpu"):
    """Rebuild a registered version as an eval-mode `nn.Module` from its checkpoint (read with
    `weights_only=True`); returns (model, resolved, checkpoint)."""
    resolved = resolve_version(uri)
    path = download_checkpoint(resolved)
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, f"{resolved.uri} ({path.name})")
    return model.to(device).eval(), resolved, ckpt

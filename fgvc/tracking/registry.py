"""The model registry: names, resolution of `models:/name@alias` and `models:/name/version`,
loading a version back as an `nn.Module`, and moving aliases.

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

from fgvc.config import INT, STR, Choice, Config, Maybe, option
from fgvc.errors import ConfigError, FgvcError
from fgvc.models.predict import model_from_checkpoint
from fgvc.tracking.models import CANDIDATE, CHAMPION, CHECKPOINT_ARTIFACT
from fgvc.training.checkpoint import read_checkpoint

log = logging.getLogger("fgvc")

__all__ = ["CANDIDATE", "CHAMPION", "PromoteConfig", "ResolvedModel", "literal", "load_model", "promote",
           "registered_name", "resolve_version"]


def registered_name(arch: str) -> str:
    """`fgvc-<arch>` with characters the registry dislikes replaced (`timm:x` -> `fgvc-timm-x`)."""
    return "fgvc-" + re.sub(r"[^A-Za-z0-9_.-]", "-", arch)


def literal(value: str) -> str:
    """A string literal for an MLflow filter, quoted with a quote character it does not hold."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ConfigError(f"name {value!r} holds both quote characters; MLflow's filters cannot match it")


def versions_of(name: str) -> list:
    return MlflowClient().search_model_versions(f"name = {literal(name)}")


def _names() -> str:
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
        raise ConfigError(f"no registered model named {name!r}; registered models: {_names()}") from None
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


@dataclass
class Promotion:
    name: str
    version: str
    alias: str
    dataset_digest: str | None
    other_digests: dict[str, int]  # digest -> versions not considered

    def describe(self) -> str:
        text = f"{self.name}@{self.alias} -> version {self.version}"
        if self.dataset_digest:
            text += f" (best among versions trained on dataset {self.dataset_digest})"
        if self.other_digests:
            text += "; not considered: " + ", ".join(f"{d} ({n} version{'s' * (n > 1)})"
                                                    for d, n in sorted(self.other_digests.items()))
        return text


def promote(name: str, metric: str = "val_acc", dataset_digest: str | None = None, version: str | None = None,
            alias: str = CHAMPION) -> Promotion:
    """Move `alias` to `version`, or to the version with the highest `metric` tag among the
    versions of ONE dataset: `dataset_digest` given, or (None) the newest version's; "any"
    mixes datasets on purpose."""
    client = MlflowClient()
    versions = versions_of(name)
    if not versions:
        raise ConfigError(f"registered model {name!r} has no versions (or does not exist); registered models: "
                          f"{_names()}")
    if version is not None:
        if str(version) not in {str(v.version) for v in versions}:
            raise ConfigError(f"registered model {name!r} has no version {version}; versions: "
                              f"{sorted(int(v.version) for v in versions)}")
        client.set_registered_model_alias(name, alias, str(version))
        return Promotion(name, str(version), alias, None, {})
    if dataset_digest is None:
        dataset_digest = max(versions, key=lambda v: int(v.version)).tags.get("dataset_digest")
    chosen = versions if dataset_digest == "any" else [v for v in versions
                                                       if v.tags.get("dataset_digest") == dataset_digest]
    if not chosen:
        digests = sorted({v.tags.get("dataset_digest", "?") for v in versions})
        raise ConfigError(f"no version of {name!r} was trained on dataset {dataset_digest}; datasets: "
                          f"{', '.join(digests)}")
    scored = [(float(v.tags[metric]), int(v.version)) for v in chosen if metric in v.tags]
    if not scored:
        raise ConfigError(f"no version of {name!r} carries the tag {metric!r}; tags present: "
                          f"{sorted({k for v in chosen for k in v.tags})}")
    best = str(max(scored)[1])
    others: dict[str, int] = {}
    if dataset_digest != "any":
        for v in versions:
            if v not in chosen:
                digest = v.tags.get("dataset_digest", "?")
                others[digest] = others.get(digest, 0) + 1
    client.set_registered_model_alias(name, alias, best)
    return Promotion(name, best, alias, None if dataset_digest == "any" else dataset_digest, others)


@dataclass(frozen=True)
class PromoteConfig(Config):
    name: str = option(STR, "fgvc-resnet18", "Registered model (fgvc-<arch>).")
    arch: str | None = option(Maybe(STR, "none"), None, "Shortcut for --name fgvc-<arch> (wins over --name).")
    metric: str = option(Choice(("val_acc", "val_balanced_acc")), "val_acc", "Version tag to maximise.")
    dataset_digest: str | None = option(
        Maybe(STR, "newest"), None, "Choose among versions of one dataset: newest (the newest version's dataset), "
        "any (mix datasets on purpose) or a digest.")
    version: int | None = option(Maybe(INT, "best"), None, "An explicit version, or best (by --metric).")
    alias: str = option(STR, CHAMPION, "The alias to move.")

    @property
    def registered_model(self) -> str:
        return registered_name(self.arch) if self.arch else self.name

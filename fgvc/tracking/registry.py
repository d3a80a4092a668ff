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

from fgvc.errors import ConfigError, FgvcError
from fgvc.models.predict import model_from_checkpoint
from fgvc.tracking.config import ANY, CANDIDATE, CHAMPION, PromoteConfig, registered_name
from fgvc.tracking.models import CHECKPOINT_ARTIFACT
from fgvc.training.checkpoint import read_checkpoint

log = logging.getLogger("fgvc")

__all__ = ["CANDIDATE", "CHAMPION", "PromoteConfig", "ResolvedModel", "literal", "load_model", "promote",
           "registered_name", "resolve_version"]


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
    """Where an alias moved, and the one-line account of what was considered and why."""

    name: str
    version: str
    alias: str
    dataset_digest: str | None  # None: datasets mixed on purpose, or an explicit version
    other_digests: dict[str, int]  # digest -> versions of other datasets, not considered
    reason: str = ""

    def describe(self) -> str:
        return f"{self.name}@{self.alias} -> version {self.version} ({self.reason})"


def dataset_label(version) -> str:
    """A version's dataset as a user knows it: the root's name and the digest."""
    root = version.tags.get("data_root", "")
    digest = version.tags.get("dataset_digest", "?")
    return f"{Path(root).name} ({digest})" if root else digest


def _matches_dataset(version, wanted: str) -> bool:
    digest, root = version.tags.get("dataset_digest", ""), version.tags.get("data_root", "")
    return (wanted == digest or (len(wanted) >= 4 and digest.startswith(wanted))
            or (bool(root) and wanted in (root, Path(root).name)))


def _count(versions) -> str:
    return f"{len(versions)} version{'s' * (len(versions) != 1)}"


def promote(name: str, metric: str = "val_acc", dataset: str | None = None, regime: str | None = None,
            version: str | None = None, alias: str = CHAMPION, dataset_digest: str | None = None) -> Promotion:
    """Move `alias` to `version`, or to the version with the highest `metric` tag among the
    versions of ONE dataset and regime.

    `dataset` (a root name, a digest or its first characters, or "any") and `regime` (a regime or
    "any") choose them; left None, they stay those of the version `alias` points at now, so a
    promotion never moves a champion to other data or another regime unasked. Without a current
    holder: the newest version's dataset, any regime. `dataset_digest` is the older spelling of
    `dataset`.
    """
    client = MlflowClient()
    dataset = dataset if dataset is not None else dataset_digest
    versions = versions_of(name)
    if not versions:
        raise ConfigError(f"registered model {name!r} has no versions (or does not exist); registered models: "
                          f"{_names()}")
    by_number = {str(v.version): v for v in versions}
    if version is not None:
        if str(version) not in by_number:
            raise ConfigError(f"registered model {name!r} has no version {version}; versions: "
                              f"{sorted(int(v) for v in by_number)}")
        client.set_registered_model_alias(name, alias, str(version))
        return Promotion(name, str(version), alias, None, {}, f"asked for explicitly, on dataset "
                         f"{dataset_label(by_number[str(version)])}")
    holder = by_number.get(str(client.get_registered_model(name).aliases.get(alias, "")))
    newest = max(versions, key=lambda v: int(v.version))
    if dataset is None:
        anchor, why_data = (holder, f"the {alias}'s") if holder else (newest, "the newest version's")
        chosen = [v for v in versions if v.tags.get("dataset_digest") == anchor.tags.get("dataset_digest")]
        data_text = f"{why_data} dataset {dataset_label(anchor)}"
    elif dataset == ANY:
        chosen, data_text = list(versions), "any dataset (asked)"
    else:
        chosen = [v for v in versions if _matches_dataset(v, dataset)]
        labels = sorted({dataset_label(v) for v in (chosen or versions)})
        if not chosen:
            raise ConfigError(f"no version of {name!r} was trained on dataset {dataset}; datasets: "
                              f"{', '.join(labels)}")
        if len(labels) > 1:
            raise ConfigError(f"dataset {dataset} names {len(labels)} datasets of {name!r}: {', '.join(labels)}; "
                              f"pass a digest")
        data_text = f"dataset {dataset_label(chosen[0])} (asked)"
    kept = holder.tags.get("regime") if holder is not None else None
    if regime is None and kept is not None and any(v.tags.get("regime") == kept for v in chosen):
        regime, regime_text = kept, f"the {alias}'s regime {kept}"
    elif regime is None and kept is not None:  # another dataset was asked for, without the champion's regime
        regime_text = f"any regime (none there is the {alias}'s {kept})"
    elif regime in (None, ANY):
        regime, regime_text = None, "any regime"
    else:
        regime_text = f"regime {regime} (asked)"
    if regime is not None:
        if not any(v.tags.get("regime") == regime for v in chosen):
            present = sorted({v.tags.get("regime", "?") for v in chosen})
            raise ConfigError(f"no version of {name!r} on {data_text.removesuffix(' (asked)')} has regime {regime}; "
                              f"regimes there: {', '.join(present)} (--regime any mixes them)")
        chosen = [v for v in chosen if v.tags.get("regime") == regime]
    scored = [(float(v.tags[metric]), int(v.version)) for v in chosen if metric in v.tags]
    if not scored:
        raise ConfigError(f"no version of {name!r} carries the tag {metric!r}; tags present: "
                          f"{sorted({k for v in chosen for k in v.tags})}")
    value, best = max(scored)
    skipped = [v for v in versions if v not in chosen]
    others: dict[str, int] = {}
    for v in skipped:
        others[v.tags.get("dataset_digest", "?")] = others.get(v.tags.get("dataset_digest", "?"), 0) + 1
    reason = f"{metric} {value:.4f}, best of {_count(chosen)} on {data_text}, {regime_text}"
    if skipped:
        groups: dict[str, int] = {}
        for v in skipped:
            key = f"{dataset_label(v)} {v.tags.get('regime', '?')}"
            groups[key] = groups.get(key, 0) + 1
        reason += "; skipped " + ", ".join(f"{n} on {k}" for k, n in sorted(groups.items()))
        reason += " (--dataset, --regime choose them)"
    client.set_registered_model_alias(name, alias, str(best))
    digest = None if dataset == ANY else by_number[str(best)].tags.get("dataset_digest")
    return Promotion(name, str(best), alias, digest, others, reason)

"""The model registry: register a training run's best checkpoint, move aliases, and load a
registered version back as a real `nn.Module` for analysis.

A version's source is `runs:/<run_id>/checkpoints`; `best.pt` there holds the state_dict and
the model spec (architecture, classes, input normalisation), so loading rebuilds the
architecture and reads the weights with `weights_only=True` — through any tracking server.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fgvc.models import build_model

log = logging.getLogger("fgvc")

CANDIDATE, CHAMPION = "candidate", "champion"


def registered_name(arch: str) -> str:
    """`fgvc-<arch>` with characters the registry dislikes replaced (`timm:x` -> `fgvc-timm-x`)."""
    return "fgvc-" + re.sub(r"[^A-Za-z0-9_.-]", "-", arch)


def register_version(run_id: str, name: str, tags: dict[str, str]) -> str:
    """A new version of `name` from the run's checkpoints; alias `candidate` moves to it."""
    client = MlflowClient()
    try:
        client.create_registered_model(name, description="fgvc designer classifier; "
                                       "load with fgvc analyze -P model=models:/<name>@<alias>")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    version = client.create_model_version(name, f"runs:/{run_id}/checkpoints", run_id=run_id,
                                          tags={k: str(v) for k, v in tags.items()})
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return str(version.version)


_URI = re.compile(r"^(?:models:/)?(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass
class ResolvedModel:
    name: str
    version: str
    run_id: str
    uri: str


def resolve_version(uri: str) -> ResolvedModel:
    """`models:/name@alias`, `models:/name/version` or `name@alias` -> the version and its run.

    Errors list what exists: the registered names for an unknown model, the aliases for an
    unknown alias, the versions for an unknown version.
    """
    m = _URI.match(uri.strip())
    if not m:
        raise ValueError(f"model {uri!r} not understood; use models:/<name>@<alias>, "
                         f"models:/<name>/<version> or <name>@<alias>")
    name, alias, number = m.group("name"), m.group("alias"), m.group("version")
    client = MlflowClient()
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        names = sorted(r.name for r in client.search_registered_models())
        raise ValueError(f"no registered model named {name!r}; registered models: "
                         f"{', '.join(names) or '(none)'}") from None
    if alias is not None:
        if alias not in registered.aliases:
            aliases = ", ".join(f"{a} (v{v})" for a, v in sorted(registered.aliases.items()))
            raise ValueError(f"registered model {name!r} has no alias {alias!r}; aliases: "
                             f"{aliases or '(none)'}")
        number = str(registered.aliases[alias])
    try:
        version = client.get_model_version(name, number)
    except MlflowException:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        raise ValueError(f"registered model {name!r} has no version {number}; versions: "
                         f"{versions}") from None
    if not version.run_id:
        raise ValueError(f"{name} version {number} has no source run, so its spec cannot be found")
    return ResolvedModel(name, str(version.version), version.run_id, f"models:/{name}/{version.version}")


def download_checkpoint(run_id: str, which: str = "best", dst: str | Path | None = None) -> Path:
    """Fetch `checkpoints/<which>.pt` of a run (local store or server) to a local file."""
    dst = str(dst or tempfile.mkdtemp(prefix="fgvc-ckpt-"))
    try:
        return Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"checkpoints/{which}.pt", dst_path=dst))
    except (MlflowException, OSError) as e:
        raise FileNotFoundError(f"run {run_id} has no checkpoints/{which}.pt: {e}") from None


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(uri: str, device: str | torch.device = "cpu"):
    """Rebuild a registered version as an eval-mode `nn.Module`; returns (model, resolved, checkpoint)."""
    resolved = resolve_version(uri)
    ckpt = load_checkpoint(download_checkpoint(resolved.run_id, "best"))
    if "spec" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{resolved.uri}: checkpoint lacks the model spec or state_dict "
                         f"(keys: {sorted(ckpt)}); it was not written by fgvc train")
    model = build_model(ckpt["spec"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), resolved, ckpt


def promote(name: str, metric: str = "val_acc", dataset_digest: str | None = None,
            version: str | None = None, alias: str = CHAMPION) -> str:
    """Move `alias` (default `champion`) to `version`, or to the version with the highest
    `metric` version tag (optionally among versions trained on one dataset digest)."""
    client = MlflowClient()
    if version is None:
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            names = ", ".join(sorted(r.name for r in client.search_registered_models()))
            raise ValueError(f"registered model {name!r} has no versions (or does not exist); "
                             f"registered models: {names or '(none)'}")
        if dataset_digest:
            versions = [v for v in versions if v.tags.get("dataset_digest") == dataset_digest]
            if not versions:
                raise ValueError(f"no version of {name!r} was trained on dataset {dataset_digest}")
        scored = [(float(v.tags[metric]), int(v.version), v.version) for v in versions if metric in v.tags]
        if not scored:
            raise ValueError(f"no version of {name!r} carries the tag {metric!r}; "
                             f"tags present: {sorted({k for v in versions for k in v.tags})}")
        version = max(scored)[2]
    else:
        client.get_model_version(name, str(version))  # raises a clear MlflowException if absent
    client.set_registered_model_alias(name, alias, str(version))
    log.info("%s@%s -> version %s", name, alias, version)
    return str(version)

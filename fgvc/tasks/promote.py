"""`promote`: move an alias (`champion`) to a registered version, as a run of its own that says
which version and why.

The choice, by default: among the versions of ONE dataset and regime (the current holder's,
so a promotion never moves a champion to other data or another regime unasked; without a
holder, the newest version's dataset and any regime), the highest `--metric` tag.
`--dataset` (a root name, a digest or its first characters, or `any`) and `--regime` (a regime
or `any`) choose others; `--version` names one. Refusals happen before a run exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from fgvc import mlflow_names
from fgvc.errors import ConfigError
from fgvc.mlflow_names import CHAMPION
from fgvc.tasks.promote_config import ANY, PromoteConfig
from fgvc.tracking.failures import acting_on
from fgvc.tracking.markdown import code
from fgvc.tracking.model_registry import registered_names, versions_of
from fgvc.tracking.runs import configure_tracking, log_params, tracked_run

EXPERIMENT_DESCRIPTION = ("Registry moves by `promote`: which alias went to which version, chosen among "
                          "versions of one dataset and regime (by default the champion's).")
EXPERIMENT = mlflow_names.REGISTRY


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


def run_promote(cfg: PromoteConfig) -> Promotion:
    """Choose the version and move the alias, then record the move as a run of its own."""
    configure_tracking()
    # The choice is made (and refused) before a run exists: a refusal leaves no FAILED run.
    promotion = choose_and_move(cfg)
    record_promotion(cfg, promotion)
    return promotion


def choose_and_move(cfg: PromoteConfig) -> Promotion:
    """:func:`promote` with the config's choices; a refusal by the server names the model."""
    with acting_on(f"registered model {cfg.registered_model}"):
        return promote(cfg.registered_model, metric=cfg.metric, dataset=cfg.dataset, regime=cfg.regime,
                       version=None if cfg.version is None else str(cfg.version), alias=cfg.alias)


def record_promotion(cfg: PromoteConfig, promotion: Promotion) -> None:
    """The run `promote-<name>-<alias>`: its description says which version and why."""
    name = cfg.registered_model
    with tracked_run(EXPERIMENT, f"promote-{name}-{cfg.alias}", task="promote",
                     description=code(promotion.describe()), experiment_description=EXPERIMENT_DESCRIPTION):
        log_params({**cfg.params(), "registered_model": name, "version_effective": promotion.version,
                    "dataset_digest_effective": promotion.dataset_digest or "any"})
        mlflow.set_tag("fgvc.model_version", f"{name}/{promotion.version}")


def promote(name: str, metric: str = "val_acc", dataset: str | None = None, regime: str | None = None,
            version: str | None = None, alias: str = CHAMPION, dataset_digest: str | None = None) -> Promotion:
    """Move `alias` to `version`, or to the version with the highest `metric` tag among the
    versions of one dataset and regime (the module docstring). `dataset_digest` is the older
    spelling of `dataset`."""
    client = MlflowClient()
    dataset = dataset if dataset is not None else dataset_digest
    versions = versions_of(name)
    if not versions:
        raise ConfigError(f"registered model {name!r} has no versions (or does not exist); registered models: "
                          f"{registered_names()}")
    by_number = {str(v.version): v for v in versions}
    if version is not None:
        chosen = explicit_version(name, by_number, str(version))
        client.set_registered_model_alias(name, alias, chosen)
        return Promotion(name, chosen, alias, None, {}, f"asked for explicitly, on dataset "
                         f"{dataset_label(by_number[chosen])}")
    holder = by_number.get(str(client.get_registered_model(name).aliases.get(alias, "")))
    candidates, data_text = of_dataset(name, versions, holder, dataset, alias)
    candidates, regime_text = of_regime(name, candidates, holder, regime, data_text, alias)
    value, best = best_by(name, candidates, metric)
    reason = f"{metric} {value:.4f}, best of {_count(candidates)} on {data_text}, {regime_text}" + \
        skipped_text([v for v in versions if v not in candidates])
    client.set_registered_model_alias(name, alias, str(best))
    digest = None if dataset == ANY else by_number[str(best)].tags.get("dataset_digest")
    return Promotion(name, str(best), alias, digest, other_datasets([v for v in versions if v not in candidates]),
                     reason)


def explicit_version(name: str, by_number: dict, version: str) -> str:
    if version not in by_number:
        raise ConfigError(f"registered model {name!r} has no version {version}; versions: "
                          f"{sorted(int(v) for v in by_number)}")
    return version


def of_dataset(name: str, versions: Sequence, holder, dataset: str | None, alias: str) -> tuple[list, str]:
    """The versions of the dataset to choose among, and how that dataset was chosen."""
    if dataset is None:
        newest = max(versions, key=lambda v: int(v.version))
        anchor, why = (holder, f"the {alias}'s") if holder else (newest, "the newest version's")
        same = [v for v in versions if v.tags.get("dataset_digest") == anchor.tags.get("dataset_digest")]
        return same, f"{why} dataset {dataset_label(anchor)}"
    if dataset == ANY:
        return list(versions), "any dataset (asked)"
    chosen = [v for v in versions if _matches_dataset(v, dataset)]
    labels = sorted({dataset_label(v) for v in (chosen or versions)})
    if not chosen:
        raise ConfigError(f"no version of {name!r} was trained on dataset {dataset}; datasets: {', '.join(labels)}")
    if len(labels) > 1:
        raise ConfigError(f"dataset {dataset} names {len(labels)} datasets of {name!r}: {', '.join(labels)}; "
                          f"pass a digest")
    return chosen, f"dataset {dataset_label(chosen[0])} (asked)"


def of_regime(name: str, chosen: list, holder, regime: str | None, data_text: str, alias: str) -> tuple[list, str]:
    """Those of `chosen` in the regime to choose among, and how that regime was chosen."""
    kept = holder.tags.get("regime") if holder is not None else None
    if regime is None and kept is not None and any(v.tags.get("regime") == kept for v in chosen):
        regime, regime_text = kept, f"the {alias}'s regime {kept}"
    elif regime is None and kept is not None:  # another dataset was asked for, without the champion's regime
        regime_text = f"any regime (none there is the {alias}'s {kept})"
    elif regime in (None, ANY):
        regime, regime_text = None, "any regime"
    else:
        regime_text = f"regime {regime} (asked)"
    if regime is None:
        return chosen, regime_text
    if not any(v.tags.get("regime") == regime for v in chosen):
        present = sorted({v.tags.get("regime", "?") for v in chosen})
        raise ConfigError(f"no version of {name!r} on {data_text.removesuffix(' (asked)')} has regime {regime}; "
                          f"regimes there: {', '.join(present)} (--regime any mixes them)")
    return [v for v in chosen if v.tags.get("regime") == regime], regime_text


def best_by(name: str, chosen: list, metric: str) -> tuple[float, int]:
    """(value, version number) of the highest `metric` tag; ties go to the newer version."""
    scored = [(float(v.tags[metric]), int(v.version)) for v in chosen if metric in v.tags]
    if not scored:
        raise ConfigError(f"no version of {name!r} carries the tag {metric!r}; tags present: "
                          f"{sorted({k for v in chosen for k in v.tags})}")
    return max(scored)


def skipped_text(skipped: list) -> str:
    """What was left out, by dataset and regime, for the promotion's account."""
    if not skipped:
        return ""
    groups: dict[str, int] = {}
    for v in skipped:
        key = f"{dataset_label(v)} {v.tags.get('regime', '?')}"
        groups[key] = groups.get(key, 0) + 1
    return "; skipped " + ", ".join(f"{n} on {k}" for k, n in sorted(groups.items())) + \
        " (--dataset, --regime choose them)"


def other_datasets(skipped: list) -> dict[str, int]:
    others: dict[str, int] = {}
    for v in skipped:
        others[v.tags.get("dataset_digest", "?")] = others.get(v.tags.get("dataset_digest", "?"), 0) + 1
    return others


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

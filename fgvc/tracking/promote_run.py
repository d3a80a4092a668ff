"""`promote` as a run of its own: which alias moved to which version, and why."""

from __future__ import annotations

import mlflow

from fgvc import experiments
from fgvc.tracking.failures import acting_on
from fgvc.tracking.markdown import code
from fgvc.tracking.config import PromoteConfig
from fgvc.tracking.registry import Promotion, promote
from fgvc.tracking.runs import configure_tracking, log_params, tracked_run

EXPERIMENT_DESCRIPTION = ("Registry moves by `promote`: which alias went to which version, chosen among "
                          "versions of one dataset and regime (by default the champion's).")
EXPERIMENT = experiments.REGISTRY


def run_promote(cfg: PromoteConfig) -> Promotion:
    configure_tracking()
    name = cfg.registered_model
    # The choice is made (and refused) before a run exists: a refusal leaves no FAILED run.
    with acting_on(f"registered model {name}"):
        promotion = promote(name, metric=cfg.metric, dataset=cfg.dataset, regime=cfg.regime,
                            version=None if cfg.version is None else str(cfg.version), alias=cfg.alias)
    with tracked_run(EXPERIMENT, f"promote-{name}-{cfg.alias}", task="promote",
                     description=code(promotion.describe()), experiment_description=EXPERIMENT_DESCRIPTION):
        log_params({**cfg.params(), "registered_model": name, "version_effective": promotion.version,
                    "dataset_digest_effective": promotion.dataset_digest or "any"})
        mlflow.set_tag("fgvc.model_version", f"{name}/{promotion.version}")
    return promotion

"""The one search for runs by their tags: resuming a training, finding a study's cells, reusing
an analysis record and closing stale runs all ask the store the same way. Every value is quoted
by :func:`literal`, so a name holding a quote can neither break a search nor change it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mlflow.tracking import MlflowClient

from fgvc.errors import FgvcError


def literal(value: str) -> str:
    """A string literal for an MLflow filter, quoted with a quote character it does not hold."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise FgvcError(f"name {value!r} holds both quote characters; MLflow's filters cannot match it")


def find_runs(tags: Mapping[str, str], experiment_ids: Sequence[str] | None = None, status: str | None = None,
              max_results: int = 50) -> list:
    """Runs carrying every tag of `tags` (and `status`, e.g. FINISHED), newest first, in
    `experiment_ids` (None: every experiment): the one search behind resuming a training,
    finding a study's cells and reusing an analysis record."""
    client = MlflowClient()
    ids = list(experiment_ids) if experiment_ids is not None else \
        [e.experiment_id for e in client.search_experiments()]
    where = [f"tags.`{key}` = {literal(str(value))}" for key, value in tags.items()]
    if status is not None:
        where.append(f"attributes.status = {literal(status)}")
    return client.search_runs(ids, " and ".join(where), max_results=max_results,
                              order_by=["attributes.start_time DESC"])

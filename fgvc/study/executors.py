"""Where a study's cells run. An executor maps the cell runner (a plain function of one cell's
job) over the jobs and returns the results in order; it calls `on_done(index, result)` as each
finishes. It knows nothing of cells: idempotence (claims, reuse, resume) lives in the runner.

- `local`: in this process, one after another.
- `ray`: one Ray task per cell with the cell's resources (`gpus`, `cpus`), retried by Ray when
  its node is lost; `address` None starts Ray on this machine (a multi-GPU box), `auto` joins
  this machine's cluster, `HOST:PORT` a remote one. `env` reaches the workers (the tracking
  URI). Ctrl-C cancels what is outstanding; what finished stays finished.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from fgvc.errors import ConfigError

log = logging.getLogger("fgvc")

OnDone = Callable[[int, Any], None]
RAY_TASK_RETRIES = 3  # a cell whose node died runs again elsewhere (the cell resumes or retrains)


def run_local(fn: Callable, jobs: Sequence, on_done: OnDone) -> list:
    results = []
    for index, job in enumerate(jobs):
        results.append(fn(job))
        on_done(index, results[-1])
    return results


@dataclass(frozen=True)
class RayExecutor:
    address: str | None = None
    gpus: float = 0.0
    cpus: float = 1.0
    env: dict[str, str] = field(default_factory=dict)
    progress: bool = True

    def __call__(self, fn: Callable, jobs: Sequence, on_done: OnDone) -> list:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'fgvc[ray]' (or pip install 'ray[default]')") \
                from None
        ray.init(address=self.address or "local", runtime_env={"env_vars": self.env}, include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
        try:
            task = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=RAY_TASK_RETRIES)(fn)
            refs = [task.remote(job) for job in jobs]
            index = {ref: i for i, ref in enumerate(refs)}
            results: list = [None] * len(jobs)
            pending = list(refs)
            with tqdm(total=len(refs), desc="cells", unit="cell", disable=not self.progress) as bar:
                try:
                    while pending:
                        done, pending = ray.wait(pending, num_returns=1)
                        i = index[done[0]]
                        results[i] = ray.get(done[0])
                        bar.update(1)
                        on_done(i, results[i])
                except BaseException:
                    for ref in pending:  # Ctrl-C or a failed cell: stop what has not finished
                        ray.cancel(ref)  # a KeyboardInterrupt in the cell: its run ends KILLED
                    raise
            return results
        finally:
            ray.shutdown()

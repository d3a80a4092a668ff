"""Where a study's cells run. An executor maps the cell runner (a plain function of one cell's
job) over the jobs and returns the results in order; it calls `on_done(index, result)` as each
finishes. It knows nothing of cells: idempotence (claims, reuse, resume) lives in the runner.

- `local`: in this process, one after another.
- `ray`: one Ray task per cell with the cell's resources (`gpus`, `cpus`), retried by Ray when
  its node is lost; `address` None starts Ray on this machine (a multi-GPU box), `auto` joins
  this machine's cluster, `HOST:PORT` a remote one. `env` reaches the workers through Ray's
  runtime environment, which Ray's dashboard and job records show: settings only (the tracking
  URI), never a credential; the workers read those from their own environment. `gpus` None
  (auto): one GPU per cell when the cluster has GPUs and the cells may use them (device auto or
  cuda), else none (:func:`gpus_per_cell`); a cell that reserves no GPU sees none, so it trains
  on the CPU rather than on a GPU Ray did not schedule it on. Ctrl-C cancels what is
  outstanding; what finished stays finished.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from fgvc.errors import ConfigError

log = logging.getLogger("fgvc")

OnDone = Callable[[int, Any], None]
RAY_TASK_RETRIES = 3  # a cell whose node died runs again elsewhere (the cell resumes or retrains)


def on_cuda(device: str | None) -> bool:
    """Whether a cell with this device (None: auto) trains on a GPU where it sees one."""
    return device is None or device.strip().lower().startswith("cuda")


def gpus_per_cell(asked: float | None, device: str | None, cluster: Mapping[str, float]) -> float:
    """The GPUs each cell reserves: ``asked`` when given (fractions share a GPU); auto (None):
    1 when the cluster has GPUs (``cluster``: Ray's cluster resources) and the device is auto,
    cuda or cuda:N, else 0. A cell on the CPU reserves none."""
    if asked is not None:
        if asked > 0 and not on_cuda(device):
            raise ConfigError(f"--gpus-per-cell {asked:g} with --device {device}: a cell there uses no GPU; leave "
                              f"--gpus-per-cell auto (or 0)")
        return float(asked)
    return 1.0 if on_cuda(device) and cluster.get("GPU", 0) > 0 else 0.0


def run_local(fn: Callable, jobs: Sequence, on_done: OnDone) -> list:
    results = []
    for index, job in enumerate(jobs):
        results.append(fn(job))
        on_done(index, results[-1])
    return results


@dataclass(frozen=True)
class RayExecutor:
    address: str | None = None
    gpus: float | None = None  # None: auto (gpus_per_cell)
    cpus: float = 1.0
    env: dict[str, str] = field(default_factory=dict)
    progress: bool = True
    device: str | None = None  # the cells' device (None: auto)

    def __call__(self, fn: Callable, jobs: Sequence, on_done: OnDone) -> list:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'fgvc[ray]' (or pip install 'ray[default]')") \
                from None
        ray.init(address=self.address or "local", runtime_env={"env_vars": dict(self.env)}, include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
        try:
            cluster = ray.cluster_resources()
            gpus = gpus_per_cell(self.gpus, self.device, cluster)
            log.info("ray: %g GPU(s) in the cluster; each cell reserves %g GPU(s) and %g CPU(s)",
                     cluster.get("GPU", 0), gpus, self.cpus)
            options: dict[str, Any] = dict(num_cpus=self.cpus, num_gpus=gpus, max_retries=RAY_TASK_RETRIES)
            if gpus == 0 and self.device is None:
                # Whether Ray hides the GPUs from a task that reserved none depends on its version:
                # hidden here, such a cell trains on the CPU, never on a GPU it was not scheduled on.
                options["runtime_env"] = {"env_vars": {**self.env, "CUDA_VISIBLE_DEVICES": ""}}
            task = ray.remote(**options)(fn)
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

"""Where a study's cells run: the GPUs a Ray task reserves, and what the workers are handed
(settings, never credentials). No Ray cluster here: a stand-in `ray` module records what the
executor asks of Ray (tests/test_cluster.py runs the real one)."""

from __future__ import annotations

import sys
import types

import pytest
from click.testing import CliRunner

from fgvc.errors import ConfigError
from fgvc.study.config import StudyConfig
from fgvc.study.executors import RayExecutor, gpus_per_cell
from fgvc.tasks.study import executor_of, worker_env

SECRETS = {"MLFLOW_TRACKING_PASSWORD": "hunter2", "MLFLOW_TRACKING_TOKEN": "tok-123",
           "MLFLOW_TRACKING_USERNAME": "alice", "AWS_ACCESS_KEY_ID": "AKIA0000", "AWS_SECRET_ACCESS_KEY": "aws-secret",
           "AWS_SESSION_TOKEN": "aws-token", "MLFLOW_S3_ENDPOINT_URL": "http://minio:9000",
           "FGVC_SERVICE_TOKEN": "fgvc-tok", "FGVC_API_KEY": "fgvc-key", "MLFLOW_GATEWAY_SECRET": "gw-secret"}
SETTINGS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "42", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "FGVC_CLAIM_POLL_S": "0.5",
            "FGVC_TRACKING_TIMEOUT_S": "300"}


@pytest.mark.parametrize("asked, device, cluster, expected", [
    (None, None, {"CPU": 32.0, "GPU": 4.0}, 1.0),   # auto on a GPU cluster: one GPU per cell
    (None, "cuda", {"CPU": 8.0, "GPU": 2.0}, 1.0),
    (None, "cuda:1", {"CPU": 8.0, "GPU": 2.0}, 1.0),
    (None, None, {"CPU": 8.0}, 0.0),                # no GPU in the cluster
    (None, None, {"CPU": 8.0, "GPU": 0.0}, 0.0),
    (None, "cpu", {"CPU": 8.0, "GPU": 4.0}, 0.0),   # a CPU cell reserves none
    (0.5, None, {"CPU": 8.0, "GPU": 1.0}, 0.5),     # explicit: two cells share a GPU
    (0.0, None, {"CPU": 8.0, "GPU": 4.0}, 0.0),
    (2.0, "cuda", {"CPU": 8.0, "GPU": 4.0}, 2.0),
    (0.0, "cpu", {"CPU": 8.0}, 0.0),
])
def test_gpus_per_cell_follow_the_option_the_device_and_the_cluster(asked, device, cluster, expected):
    assert gpus_per_cell(asked, device, cluster) == expected


def test_gpus_for_a_cell_on_the_cpu_are_refused_in_one_line_before_the_study_starts():
    message = r"^--gpus-per-cell 1 with --device cpu: a cell there uses no GPU; leave --gpus-per-cell auto \(or 0\)$"
    with pytest.raises(ConfigError, match=message):
        gpus_per_cell(1.0, "cpu", {"GPU": 4.0})
    with pytest.raises(ConfigError, match=message):
        StudyConfig(executor="ray", gpus_per_cell=1.0, device="cpu").plan()


def test_the_gpus_per_cell_option_defaults_to_auto_and_says_what_auto_means():
    from fgvc.cli import main

    assert StudyConfig().gpus_per_cell is None and StudyConfig(gpus_per_cell=0.5).gpus_per_cell == 0.5
    assert StudyConfig().params()["gpus_per_cell"] == "auto"
    with pytest.raises(ConfigError, match="must be >= 0"):
        StudyConfig(gpus_per_cell=-1.0)
    text = " ".join(CliRunner().invoke(main, ["study", "--help"], terminal_width=400).output.split())
    assert "--gpus-per-cell" in text and "auto: 1 when the Ray cluster has GPUs and --device is auto, cuda or cuda:N" \
        in text, text


def test_ray_workers_get_the_tracking_uri_and_settings_never_a_credential(tmp_path, monkeypatch):
    for name, value in {**SECRETS, **SETTINGS}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")  # relative: a worker elsewhere needs it absolute
    executor = executor_of(StudyConfig(executor="ray", cpus_per_cell=2.0), progress=False)
    assert isinstance(executor, RayExecutor) and executor.gpus is None and executor.cpus == 2.0
    assert executor.env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert {k: executor.env[k] for k in SETTINGS} == SETTINGS
    assert not set(SECRETS) & set(executor.env), sorted(executor.env)
    assert not any(value in str(executor.env) for value in SECRETS.values())
    assert all(k == "MLFLOW_TRACKING_URI" or k.startswith(("MLFLOW_HTTP_REQUEST_", "FGVC_")) for k in executor.env)


@pytest.mark.parametrize("uri, where", [
    ("http://alice:hunter2@tracking.example:5000", "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
    ("https://alice:hunter2@tracking.example/mlflow", "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
    ("postgresql://alice:hunter2@db.example:5432/mlflow", "the database's own password file"),
])
def test_a_tracking_uri_with_a_password_is_refused_for_ray_in_one_line(uri, where):
    with pytest.raises(ConfigError) as refused:
        worker_env({}, uri)
    message = str(refused.value)
    assert "\n" not in message and "hunter2" not in message, message
    assert message.startswith("--executor ray: the tracking URI carries a password, which Ray would show in its "
                              "dashboard and job records; give "), message
    assert where in message and "in the workers' own environment (where `ray start` runs on each node)" in message
    assert worker_env({}, "http://tracking.example:5000") == {"MLFLOW_TRACKING_URI": "http://tracking.example:5000"}


class FakeRay(types.ModuleType):
    """The part of Ray's API the executor uses, run in this process, recording the calls."""

    def __init__(self, cluster: dict[str, float]):
        super().__init__("ray")
        self.cluster, self.inits, self.tasks = cluster, [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)

    def cluster_resources(self):
        return dict(self.cluster)

    def remote(self, **options):
        def wrap(fn):
            self.tasks.append(options)
            return types.SimpleNamespace(remote=lambda job: fn(job))  # a ref is the result itself here
        return wrap

    def wait(self, pending, num_returns=1):
        return pending[:num_returns], pending[num_returns:]

    def get(self, ref):
        return ref

    def cancel(self, ref):
        pass

    def shutdown(self):
        pass


@pytest.mark.parametrize("cluster, device, gpus, hidden", [
    ({"CPU": 16.0, "GPU": 8.0}, None, 1.0, False),   # GPU cluster, device auto: a GPU each, scheduled by Ray
    ({"CPU": 16.0}, None, 0.0, True),                 # no GPU reserved: none seen, the cell trains on the CPU
    ({"CPU": 16.0, "GPU": 8.0}, "cpu", 0.0, False),
])
def test_the_ray_executor_reserves_the_resolved_gpus_and_hands_over_only_the_env(monkeypatch, cluster, device, gpus,
                                                                                 hidden):
    ray = FakeRay(cluster)
    monkeypatch.setitem(sys.modules, "ray", ray)
    env = {"MLFLOW_TRACKING_URI": "http://tracking.example:5000", "FGVC_CLAIM_POLL_S": "0.5"}
    done = []
    results = RayExecutor(None, None, 1.0, env, progress=False, device=device)(lambda job: job * 10, [1, 2, 3],
                                                                               lambda i, r: done.append((i, r)))
    assert results == [10, 20, 30] and done == [(0, 10), (1, 20), (2, 30)]
    [init] = ray.inits
    assert init["runtime_env"] == {"env_vars": env}
    [task] = ray.tasks
    assert task["num_gpus"] == gpus and task["num_cpus"] == 1.0
    assert ("runtime_env" in task) == hidden
    if hidden:
        assert task["runtime_env"] == {"env_vars": {**env, "CUDA_VISIBLE_DEVICES": ""}}

"""The shared tracking server: a real PostgreSQL and `mlflow server` (server-proxied artifacts,
basic-auth) on 127.0.0.1. Training, registration, `promote` and `analyze` by alias work through
it unchanged; two users training at once lose nothing; strangers are refused.

Skipped with the reason when PostgreSQL cannot be started here; `.ci/run` installs what it needs.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from server_utils import MlflowServer, PostgresCluster, Unavailable

from fgvc.cli import main as cli

METRICS = ["train/loss", "train/acc", "val/loss", "val/acc", "val/top5", "val/error", "val/balanced_acc",
           "lr/backbone", "lr/head", "time/epoch_s", "throughput/train_img_s"]
TRAIN = ["--arch", "fn-small", "--epochs", "2", "--batch-size", "8", "--num-workers", "0"]
RUN_DONE = re.compile(r"run ([0-9a-f]{32}): best val acc")
pytestmark = pytest.mark.slow

PASSWORDS = {"admin": "fgvc-admin-password", "alice": "alice-password-123", "bob": "bob-password-1234"}


def unavailable(reason: str) -> None:
    """Skip, except where PostgreSQL is required (`.ci/run` sets FGVC_REQUIRE_POSTGRES=1)."""
    if os.environ.get("FGVC_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"FGVC_REQUIRE_POSTGRES=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def postgres():
    try:
        cluster = PostgresCluster()
    except Unavailable as e:
        unavailable(str(e))
    try:
        cluster.start()
    except Unavailable as e:
        cluster.stop()
        unavailable(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """`mlflow server` on PostgreSQL with proxied artifacts and basic-auth; users alice and bob."""
    if importlib.util.find_spec("flask_wtf") is None:
        unavailable("basic-auth needs Flask-WTF: pip install 'mlflow[auth]'")
    workdir = tmp_path_factory.mktemp("mlflow-server")
    config = workdir / "basic_auth.ini"
    # auth_cache_ttl_seconds: check each password once a minute, not on every request (PBKDF2)
    config.write_text("[mlflow]\ndefault_permission = EDIT\nadmin_username = admin\nauth_cache_ttl_seconds = 60\n"
                      f"database_uri = {postgres.create_database('mlflow_auth')}\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORDS["admin"],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "fgvc-test-csrf-key"}
    with MlflowServer(workdir, postgres.create_database("mlflow"), app_name="basic-auth", env=env) as running:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            patch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORDS["admin"])
            from mlflow.server import get_app_client  # the server app: 1 s of every collection

            auth = get_app_client("basic-auth", tracking_uri=running.uri)
            for user in ("alice", "bob"):
                auth.create_user(user, PASSWORDS[user])
        yield running


def client_env(server: MlflowServer, user: str, password: str | None = None) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": server.uri, "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": password or PASSWORDS[user]}


def log_in(monkeypatch, server: MlflowServer, user: str, password: str | None = None) -> MlflowClient:
    """This test's clients (and their subprocesses) talk to the server as `user`."""
    for name, value in client_env(server, user, password).items():
        monkeypatch.setenv(name, value)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(server.uri)
    return MlflowClient(server.uri)


def train_concurrently(root: Path, cwd: Path, envs: list[dict], *extra: str) -> list[str]:
    """`fgvc train` in one process per env (seed = its index), all at once; returns the run ids."""
    procs = [subprocess.Popen([sys.executable, "-m", "fgvc.cli", "train", *TRAIN, "--data-root", str(root),
                               "--seed", str(seed), *extra],
                              cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed, env in enumerate(envs)]
    run_ids = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert "database is locked" not in err
        run_ids.append(RUN_DONE.search(out).group(1))  # the command's last line, on stdout
    return run_ids


@pytest.fixture(scope="module")
def concurrent_runs(server, tiny_root, tmp_path_factory) -> dict[str, str]:
    """alice and bob train at the same time (from an empty directory); user -> run id."""
    cwd = tmp_path_factory.mktemp("clients")
    run_ids = train_concurrently(tiny_root, cwd, [client_env(server, "alice"), client_env(server, "bob")])
    assert not any(cwd.iterdir())  # nothing was written on the client side
    return dict(zip(("alice", "bob"), run_ids, strict=True))


def artifact_paths(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def assert_complete_training_run(client: MlflowClient, run_id: str, epochs: int = 2) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in METRICS:
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(1, epochs + 1)), key
    assert {"checkpoints/best.pt", "checkpoints/last.pt", "plots/loss.png", "run_summary.md"} <= \
        artifact_paths(client, run_id)


def stored_on_server(server: MlflowServer, run_id: str, name: str) -> list[Path]:
    """Files under the server's --artifacts-destination for this run."""
    return [p for p in server.artifacts.rglob(name) if run_id in p.parts]


def test_two_users_training_at_once_both_get_complete_runs(server, concurrent_runs, monkeypatch):
    client = log_in(monkeypatch, server, "alice")
    experiment = client.get_experiment_by_name("fgvc-train")
    for run_id in concurrent_runs.values():
        assert_complete_training_run(client, run_id)
        run = client.get_run(run_id)
        assert run.info.experiment_id == experiment.experiment_id and run.data.params["world_size"] == "1"
        # artifacts went through the server's proxy into its store
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert stored_on_server(server, run_id, "best.pt")
    versions = client.search_model_versions("name='fgvc-fn-small'")
    assert sorted(v.run_id for v in versions) == sorted(concurrent_runs.values())
    assert sorted(int(v.version) for v in versions) == [1, 2]


def test_promote_and_analyze_by_alias_through_the_server(server, concurrent_runs, monkeypatch, tmp_path):
    client = log_in(monkeypatch, server, "alice")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    promoted = runner.invoke(cli, ["promote", "--name", "fgvc-fn-small"])
    assert promoted.exit_code == 0, f"{promoted.output}\n{promoted.exception!r}"
    versions = client.search_model_versions("name='fgvc-fn-small'")
    best = max(versions, key=lambda v: (float(v.tags["val_acc"]), int(v.version)))
    assert client.get_model_version_by_alias("fgvc-fn-small", "champion").version == best.version
    assert f"fgvc-fn-small@champion -> version {best.version}" in promoted.output

    if "analyze" not in cli.commands:
        pytest.skip("`fgvc analyze` is not in this checkout yet: train and promote passed")
    analyzed = runner.invoke(cli, ["analyze", "--model", "models:/fgvc-fn-small@champion", "--method", "gradcam",
                                   "--num-images", "6", "--batch-size", "6", "--device", "cpu"])
    assert analyzed.exit_code == 0, f"{analyzed.output}\n{analyzed.exception!r}"
    files = artifact_paths(client, best.run_id, "analysis/gradcam")
    assert files and all(f.startswith("analysis/gradcam/") for f in files)
    assert stored_on_server(server, best.run_id, "gradcam")
    metrics = client.get_run(best.run_id).data.metrics
    assert any(key.startswith("gradcam/") for key in metrics), sorted(metrics)
    assert not any(tmp_path.iterdir())  # the checkpoint came from the server, nothing stayed here


def test_basic_auth_refuses_strangers_and_records_who_created_what(server, concurrent_runs, monkeypatch):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
    assert refused.value.code == 401

    log_in(monkeypatch, server, "alice", password="not-alices-password")
    denied = CliRunner().invoke(cli, ["promote", "--name", "fgvc-fn-small"])
    assert denied.exit_code != 0

    client = log_in(monkeypatch, server, "admin")
    experiment_id = client.get_experiment_by_name("fgvc-train").experiment_id
    from mlflow.server import get_app_client

    auth = get_app_client("basic-auth", tracking_uri=server.uri)
    # whoever created the shared experiment manages it; the other logs into it by default_permission
    permissions = {user: auth.get_user_permission(user, "experiment", experiment_id).permission
                   for user in ("alice", "bob")}
    assert sorted(permissions.values()) == ["EDIT", "MANAGE"], permissions


def test_two_concurrent_trainings_complete_on_sqlite(tiny_root, tmp_path):
    """The default local store under the same load, once the store exists: two processes that
    both create a new SQLite store race on its schema (see docs/team.md)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.search_experiments()  # creates the schema
    run_ids = train_concurrently(tiny_root, tmp_path, [{"MLFLOW_TRACKING_URI": uri}] * 2)
    for run_id in run_ids:
        assert_complete_training_run(client, run_id)
    assert sorted(int(v.version) for v in client.search_model_versions("name='fgvc-fn-small'")) == [1, 2]

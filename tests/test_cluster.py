"""The study on several processes and machines: claims in the tracking store, identical studies
started together, a Slurm-style array of `fgvc study --cell`, the Ray executor.

The slow cases share one local-executor study of a 4-cell grid (the reference table) and
compare every other way of running the same grid against it: the same config ids, the same
validation accuracies, the same table.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from server_utils import MlflowServer, PostgresCluster, Unavailable
from stores import new_store

from fgvc.cli import main
from fgvc.errors import ConfigError
from fgvc.study.config import StudyConfig
from fgvc.tasks.study import run_study
from fgvc.tracking import claims
from fgvc.tracking.claims import Holder, claimed, ledger_run
from fgvc.tracking.logged_model import move_alias

GRID = ["--num-designers", "3", "--train-per-class", "8", "--val-per-class", "4", "--height", "32", "--width", "24",
        "--epochs", "1", "--batch-size", "8", "--num-images", "6", "--regimes", "unmasked,masked", "--seeds", "0,1"]
CONFIG = dict(num_designers=3, train_per_class=8, val_per_class=4, height=32, width=24, epochs=1, batch_size=8,
              num_images=6, regimes=("unmasked", "masked"), seeds=(0, 1))
SAME = ["arch", "regime", "seed", "bg_correlation", "run_name", "chance", "verdict"]  # and every measured column


@pytest.fixture(scope="module")
def claims_store(tmp_path_factory):
    """One SQLite store for the claim cases (a new store costs seconds of migrations); each
    case claims its own keys."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('claims')}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("FGVC_CLAIM_POLL_S", "0.05")
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        patch.setattr(claims, "_ledgers", {})
        mlflow.set_tracking_uri(uri)
        yield uri


# --- claims ----------------------------------------------------------------------------------

def test_the_ledger_is_named_once_when_several_callers_need_it_together(claims_store):
    assert MlflowClient().get_experiment_by_name(claims.POINTER) is None  # the first case on this store
    found = []
    threads = [threading.Thread(target=lambda: found.append(ledger_run(MlflowClient()))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client = MlflowClient()
    assert len(found) == 4 and len(set(found)) == 1  # every caller got it (none died in a race)
    live = client.search_runs([client.get_experiment_by_name(claims.EXPERIMENT).experiment_id])
    assert [r.info.run_id for r in live] == found[:1] and live[0].info.status == "FINISHED"
    assert client.get_experiment_by_name(claims.POINTER).lifecycle_stage == "deleted"  # hidden from the UI


def test_a_claim_is_held_by_one_holder_at_a_time_and_the_second_knows_it_waited(claims_store):
    spans: dict[str, tuple] = {}

    def work(name: str) -> None:
        with claimed("cell.k", client=MlflowClient()) as claim:
            begin = time.monotonic()
            time.sleep(0.5)
            spans[name] = (begin, time.monotonic(), claim.attempt, claim.waited)

    first = threading.Thread(target=work, args=("first",))
    first.start()
    time.sleep(0.2)
    second = threading.Thread(target=work, args=("second",))
    second.start()
    first.join()
    second.join()
    assert spans["first"][2:] == (1, False) and spans["second"][2:] == (2, True)
    assert spans["second"][0] >= spans["first"][1]  # never both at once
    ledger = MlflowClient().get_run(ledger_run(MlflowClient())).data
    assert ledger.tags["cell.k.1"].startswith("done ") and ledger.tags["cell.k.2"].startswith("done ")


def test_a_dead_holders_claim_is_taken_over_and_says_why(claims_store):
    client = MlflowClient()
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid no longer exists
    client.log_param(ledger_run(client), "cell.dead.1", Holder(socket.gethostname(), gone.pid, "x", time.time())
                     .render())
    with claimed("cell.dead", client=client) as claim:
        assert claim.attempt == 2 and not claim.waited
        assert claim.replaced == f"process {gone.pid} on {socket.gethostname()} died"


def test_a_failed_attempt_is_taken_over_at_once(claims_store):
    with pytest.raises(RuntimeError):
        with claimed("cell.f"):
            raise RuntimeError("boom")
    with claimed("cell.f") as claim:
        assert claim.attempt == 2 and claim.replaced == "failed"


def test_processes_moving_one_alias_at_once_all_succeed(claims_store):
    """Six writers point one alias at six versions together, eight times over: none fails (a
    store may refuse the second insert of an alias both found missing), the alias ends on one
    of them."""
    def move(name: str, version: str, errors: list[str]) -> None:
        try:
            move_alias(MlflowClient(), name, "candidate", version)
        except Exception as e:  # noqa: BLE001 (collected, asserted below)
            errors.append(str(e).splitlines()[0])

    client = MlflowClient()
    for trial in range(8):
        name = f"race-{trial}"
        client.create_registered_model(name)
        versions = [client.create_model_version(name, source="file:///nowhere").version for _ in range(6)]
        errors: list[str] = []
        threads = [threading.Thread(target=move, args=(name, v, errors)) for v in versions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert client.get_registered_model(name).aliases["candidate"] in versions


# --- the study on several processes ------------------------------------------------------------

def cli_env(uri: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri, "FGVC_CLAIM_POLL_S": "0.2"}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def cli(args: list[str], cwd: Path, uri: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fgvc.cli", *args], cwd=cwd, env=cli_env(uri), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(*procs: subprocess.Popen, timeout: float = 600) -> list[str]:
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, out[-4000:]
        outputs.append(out)
    return outputs


def store(tmp_path_factory, template: Path, name: str) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp(name)
    return folder, new_store(template, folder)


def study_runs(uri: str) -> list:
    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name("fgvc-study").experiment_id],
                              "tags.`fgvc.task` = 'study'")


def table(uri: str, study_run_id: str) -> dict[str, dict]:
    """The study's results.csv by cell, each row with its training run's config id."""
    client = MlflowClient(uri)
    with mlflow.utils.file_utils.TempDir() as tmp:  # noqa: SIM117
        path = client.download_artifacts(study_run_id, "study/results.csv", tmp.path())
        rows = list(csv.DictReader(io.StringIO(Path(path).read_text())))
    for row in rows:
        row["config_id"] = client.get_run(row["run_id"]).data.tags["fgvc.config_id"]
    return {f"{r['arch']}/{r['regime']}/{r['seed']}/{r['bg_correlation']}": r for r in rows}


def assert_same_table(found: dict[str, dict], reference: dict[str, dict]) -> None:
    assert sorted(found) == sorted(reference)
    measured = [k for k in next(iter(reference.values())) if k not in SAME + ["run_id", "status", "model"]]
    assert "val_acc" in measured and "config_id" in measured
    for key, row in reference.items():
        for column in SAME + measured:
            a, b = found[key][column], row[column]
            try:
                assert math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9) or (a == b), (key, column, a, b)
            except ValueError:
                assert a == b, (key, column, a, b)


def assert_nothing_running(uri: str) -> None:
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    running = client.search_runs(experiments, "attributes.status = 'RUNNING'")
    assert not running, [(r.info.run_name, r.data.tags.get("fgvc.task")) for r in running]


def trainings(uri: str, status: str = "FINISHED") -> list:
    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name("fgvc-study").experiment_id],
                              f"tags.`fgvc.task` = 'train' and attributes.status = '{status}'")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, store_template) -> dict[str, dict]:
    """The 4-cell grid with the local executor: the table every other way must reproduce."""
    folder, uri = store(tmp_path_factory, store_template, "local")
    finish(cli(["study", *GRID], folder, uri))
    [study] = study_runs(uri)
    assert study.info.status == "FINISHED" and study.data.metrics["study/cells_trained"] == 4
    return table(uri, study.info.run_id)


@pytest.mark.slow
def test_two_identical_studies_train_each_cell_once_and_identical_pixels_once(tmp_path_factory, store_template):
    """Two dose-response studies started together; the masked roots at both strengths are the
    same pixels: one training in all, each analysis record computed once, nothing RUNNING."""
    folder, uri = store(tmp_path_factory, store_template, "twice")
    args = ["study", *GRID[:-4], "--regimes", "masked", "--seeds", "0", "--bg-correlations", "0,1"]
    finish(cli(args, folder, uri), cli(args, folder, uri))
    studies = study_runs(uri)
    assert [s.info.status for s in studies] == ["FINISHED", "FINISHED"]
    assert sum(s.data.metrics["study/cells_trained"] for s in studies) == 1
    assert sum(s.data.metrics["study/cells_reused"] for s in studies) == 3
    assert len(trainings(uri)) == 1 and not trainings(uri, "KILLED") and not trainings(uri, "FAILED")
    client = MlflowClient(uri)
    records = client.search_runs([client.get_experiment_by_name("fgvc-analysis").experiment_id])
    # 2 strengths x 2 analyses, and the maps' sanity check once per architecture
    assert len(records) == 5 and {r.info.status for r in records} == {"FINISHED"}
    first, second = (table(uri, s.info.run_id) for s in studies)
    assert_same_table(first, second)
    assert_nothing_running(uri)


@pytest.mark.slow
def test_an_array_of_single_cells_then_collect_gives_the_local_table(tmp_path_factory, reference,
                                                                      store_template):
    """What `docs/team.md`'s Slurm array does: `--list-cells` counts the tasks, every task runs
    `fgvc study ... --cell $SLURM_ARRAY_TASK_ID` (all at once), then `--collect` builds the
    study. The grid's first seed only (two tasks): its rows must equal the local executor's."""
    folder, uri = store(tmp_path_factory, store_template, "array")
    grid = [*GRID[:-1], "0"]
    keys = CliRunner().invoke(main, ["study", *grid, "--list-cells"]).output.split()
    assert keys == ["fn-small/unmasked/seed0", "fn-small/masked/seed0"]
    task = 'exec "$PYTHON" -m fgvc.cli study "$@" --cell "$SLURM_ARRAY_TASK_ID"'  # study.sbatch's line
    outputs = finish(*[subprocess.Popen(["bash", "-c", task, "study.sbatch", *grid], cwd=folder, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env={**cli_env(uri), "PYTHON": sys.executable,
                                             "SLURM_ARRAY_TASK_ID": str(index)})
                       for index in range(len(keys))])
    assert all(f"cell {key}: trained run" in out for key, out in zip(keys, outputs, strict=True))
    assert not study_runs(uri)
    finish(cli(["study", *grid, "--collect"], folder, uri))
    [study] = study_runs(uri)
    assert study.info.status == "FINISHED" and study.data.metrics["study/cells_reused"] == 2
    assert_same_table(table(uri, study.info.run_id), {k: v for k, v in reference.items() if "/0/" in k})
    assert len(trainings(uri)) == 2
    assert not MlflowClient(uri).get_registered_model("fgvc-study-fn-small").aliases  # a cell moves no alias
    assert_nothing_running(uri)


def test_collect_refuses_a_cell_nobody_trained_and_fails_the_study_run(claims_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = StudyConfig(**CONFIG)
    with pytest.raises(ConfigError, match=r"^study cell fn-small/unmasked/seed0 has no finished training run yet; "
                                          r"run `fgvc study --cell fn-small/unmasked/seed0` \(with the same options\) "
                                          r"first$"):
        run_study(cfg, progress=False, collect=True)
    [study] = study_runs(claims_store)
    assert study.info.status == "FAILED" and not trainings(claims_store, "RUNNING")


def test_a_cell_that_is_not_in_the_study_is_refused_in_one_line():
    out = CliRunner().invoke(main, ["study", *GRID, "--cell", "4"]).output
    assert out == "Error: --cell 4: the study has 4 cells (0 to 3)\n"
    out = CliRunner().invoke(main, ["study", *GRID, "--cell", "resnet18/masked/seed0"]).output
    assert out.startswith("Error: --cell 'resnet18/masked/seed0' is not a cell of this study")
    assert CliRunner().invoke(main, ["study", *GRID, "--list-cells"]).output.split() == \
        [c.key for c in StudyConfig(**CONFIG).plan().cells()]


# --- a tracking server on PostgreSQL with its artifacts in an S3 object store ---------------------

BUCKET = "fgvc-artifacts"
S3_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                "MLFLOW_S3_ENDPOINT_URL")


def unavailable(reason: str) -> None:
    if os.environ.get("FGVC_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"FGVC_REQUIRE_POSTGRES=1 but {reason}")
    pytest.skip(reason)


@contextlib.contextmanager
def moto_s3(workdir: Path):
    """moto's standalone S3 server on loopback, with one bucket; stopped at the end."""
    pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(workdir / "moto.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # it answers
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert proc.poll() is None and time.monotonic() < deadline, (workdir / "moto.log").read_text()
                time.sleep(0.3)
        s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        yield url, s3
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """The team setup of docs/team.md on loopback: `mlflow server` on PostgreSQL with
    `--artifacts-destination s3://...` on moto. The S3 endpoint and credentials are the
    server's environment only: clients hold none. Yields (server, s3 client)."""
    workdir = tmp_path_factory.mktemp("object-store")
    try:
        postgres = PostgresCluster()
    except Unavailable as e:
        unavailable(str(e))
    try:
        postgres.start()
        with moto_s3(workdir) as (url, s3):
            server = MlflowServer(workdir, postgres.create_database("mlflow"),
                                  env={"MLFLOW_S3_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test",
                                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"})
            server.artifacts = f"s3://{BUCKET}/mlflow"
            with server:
                yield server, s3
    except Unavailable as e:
        unavailable(str(e))
    finally:
        postgres.stop()


def bucket_keys(s3) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.mark.slow
def test_a_client_without_s3_credentials_trains_registers_loads_and_analyses_through_the_object_store(
        tracking_server, tiny_root, tmp_path, monkeypatch):
    server, s3 = tracking_server
    for name in S3_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    env = {**cli_env(server.uri)}
    assert not set(S3_VARIABLES) & set(env)
    [out] = finish(subprocess.Popen([sys.executable, "-m", "fgvc.cli", "train", "--arch", "fn-small", "--epochs", "1",
                                     "--batch-size", "8", "--num-workers", "0", "--data-root", str(tiny_root)],
                                    cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT))
    run_id = re.search(r"run ([0-9a-f]{32}): best val acc", out).group(1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(server.uri)
    client = MlflowClient(server.uri)
    [version] = client.search_model_versions(f"run_id = '{run_id}'")
    client.set_registered_model_alias(version.name, "champion", version.version)
    model = mlflow.pyfunc.load_model(f"models:/{version.name}@champion")
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 24, 3), dtype=np.uint8)  # NHWC uint8
    assert len(model.predict(images)["designer"]) == 2
    from fgvc.analysis.config import AnalyzeConfig
    from fgvc.tasks.analyze import run_analyze

    outcome = run_analyze(AnalyzeConfig(model=f"models:/{version.name}@champion", method=("occlusion",),
                                        num_images=4, window=8, stride=8))
    keys = bucket_keys(s3)
    assert any(k.endswith(f"{run_id}/artifacts/checkpoints/best.pt") for k in keys), keys[:20]
    assert any(k.endswith("/MLmodel") for k in keys)
    assert any(f"{outcome.record_run_id}/artifacts/analysis/occlusion/" in k for k in keys)
    assert not list(Path(server.workdir).glob("artifacts/**/best.pt"))  # nothing on the server's disk


# --- the Ray executor --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_start(args: list[str], env: dict) -> subprocess.Popen:
    """`ray start` in a session of its own: its daemons stay in its process group, which the
    fixture kills at the end."""
    proc = subprocess.Popen(["ray", "start", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                             "--object-store-memory", "80000000", "--disable-usage-stats", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    return proc


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray head and one worker node on loopback, one CPU and a small object store each."""
    pytest.importorskip("ray")
    import tempfile

    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    # A home of its own: a ~/.ray/auth_token left by another Ray makes the head demand it.
    env = {**os.environ, "RAY_memory_monitor_refresh_ms": "0", "RAY_USAGE_STATS_ENABLED": "0", "HOME": temp}
    nodes = []
    try:
        nodes.append(ray_start(["--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", temp],
                               env))
        nodes.append(ray_start(["--address", f"127.0.0.1:{port}"], env))
        yield f"127.0.0.1:{port}"
    finally:
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
        current = Path("/tmp/ray/ray_current_cluster")  # where `ray.init("auto")` would look for this cluster
        with contextlib.suppress(OSError):
            if current.read_text().strip().endswith(f":{port}"):
                current.unlink()


@pytest.mark.slow
def test_the_ray_executor_on_a_head_and_a_worker_gives_the_local_table(tmp_path_factory, reference, ray_cluster,
                                                                       tracking_server):
    """Through the team's server (PostgreSQL, artifacts on S3): the cells' runs, models and
    records land there, and the table equals the local executor's."""
    server, s3 = tracking_server
    folder, uri = tmp_path_factory.mktemp("ray"), server.uri
    [out] = finish(cli(["study", *GRID, "--executor", "ray", "--ray-address", ray_cluster, "--cpus-per-cell", "1"],
                       folder, uri))
    assert out.count("study: cell ") >= 4 and "cells: 100%" in out
    [study] = study_runs(uri)
    assert study.info.status == "FINISHED" and study.data.metrics["study/cells_trained"] == 4
    assert study.data.params["executor"] == "ray"
    assert_same_table(table(uri, study.info.run_id), reference)
    assert any(k.endswith(f"{study.info.run_id}/artifacts/study/report.html") for k in bucket_keys(s3))
    finished = trainings(uri)
    assert sorted(r.data.tags["fgvc.study_cell"] for r in finished) == sorted(
        c.key for c in StudyConfig(**CONFIG).plan().cells())  # each cell FINISHED exactly once
    assert_nothing_running(uri)


# --- one training across nodes -----------------------------------------------------------------

@pytest.mark.slow
def test_two_torchrun_agents_give_one_run_with_the_metrics_of_one_process(tiny_root, mlflow_store, tmp_path):
    """Two nodes' worth of torchrun agents on loopback (c10d rendezvous, one gloo process each):
    exactly one run, logged by global rank 0, with the numbers of one process (which
    tests/test_ddp.py shows `--nproc 2` on one node gives too)."""
    from test_ddp import METRICS, OPTIONS, cli_args, history

    from fgvc.tasks.train import run_train
    from fgvc.training.config import TrainConfig

    single = run_train(TrainConfig(data_root=str(tiny_root), registered_model=False, **OPTIONS), progress=False)
    port = free_port()
    env = {**cli_env(mlflow_store), "CUDA_VISIBLE_DEVICES": ""}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
                                "fgvc-test", "--node-rank", str(node), "-m", "fgvc.cli", "train",
                                *cli_args(tiny_root)], cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
              for node in (0, 1)]
    finish(*agents, timeout=300)
    runs = mlflow.search_runs(experiment_names=["fgvc-train"], order_by=["attributes.start_time ASC"])
    assert len(runs) == 2  # the one-process reference and ONE run for both nodes
    run = MlflowClient().get_run(runs.run_id.tolist()[1])
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    for key in METRICS:
        assert [step for step, _ in history(run.info.run_id, key)] == [1, 2], key
    for key in ("val/loss", "val/acc", "val/top5", "train/loss", "train/acc"):
        assert [v for _, v in history(run.info.run_id, key)] == pytest.approx(
            [v for _, v in history(single.run_id, key)], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_a_cell_whose_ray_worker_is_killed_runs_again_and_nothing_is_left_running(tmp_path_factory, ray_cluster,
                                                                                   store_template):
    """SIGKILL the process training a cell (found through its claim): Ray retries the task, the
    retry takes the claim over, and the dead attempt's run is closed saying why (or resumed)."""
    folder, uri = store(tmp_path_factory, store_template, "killed")
    study = cli(["study", *GRID[:-4], "--regimes", "unmasked", "--seeds", "0", "--epochs", "3", "--executor", "ray",
                 "--ray-address", ray_cluster], folder, uri)
    client = MlflowClient(uri)
    deadline = time.monotonic() + 300
    victim = None
    while victim is None and study.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        with contextlib.suppress(Exception):
            experiment = client.get_experiment_by_name("fgvc-study").experiment_id
            if client.search_runs([experiment], "tags.`fgvc.task` = 'train' and attributes.status = 'RUNNING'"):
                ledger = client.get_run(ledger_run(client)).data.params
                victim = next(Holder.parse(v) for k, v in ledger.items() if k.startswith("cell."))
    assert victim is not None, study.communicate()[0][-3000:]
    os.kill(victim.pid, signal.SIGKILL)
    finish(study)
    [parent] = study_runs(uri)
    assert parent.info.status == "FINISHED" and parent.data.metrics["study/cells"] == 1
    [finished] = trainings(uri)
    killed = trainings(uri, "KILLED")
    if killed:  # retrained: the dead attempt's run says why it ended
        assert len(killed) == 1 and parent.data.metrics["study/cells_trained"] == 1
        assert f"process {victim.pid} on {socket.gethostname()} died; study cell attempt 2 took over" == \
            killed[0].data.tags["fgvc.end_reason"]
    else:  # resumed from its checkpoint
        assert parent.data.metrics["study/cells_resumed"] == 1
        assert finished.data.tags["fgvc.resumed_after"].startswith(f"process {victim.pid} on")
    assert_nothing_running(uri)

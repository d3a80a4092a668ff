"""Faults a team meets: the tracking server gone, a full disk, a killed process, a hostile
file, a denied permission. Each ends in one `Error:` line naming the thing, no traceback, and
no run left RUNNING (or a stale one closed as KILLED with its reason)."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from server_utils import MlflowServer

TRAIN = ["--arch", "fn-small", "--batch-size", "8", "--num-workers", "0"]
RUN_ID = re.compile(r"\b([0-9a-f]{32})\b")


def fgvc(*argv: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fgvc.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=timeout)


def one_error(stderr: str) -> str:
    """The single `Error:` line of a refused command (and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def runs_of(client: MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


# --- 1. the tracking server goes away and stays away ------------------------------------------

def _first_epoch_logged(client: MlflowClient, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in runs_of(client, "fgvc-train"):
            if client.get_metric_history(run.info.run_id, "val/acc"):
                return run.info.run_id
        time.sleep(0.2)
    raise AssertionError("no epoch was logged")


@pytest.mark.slow
def test_server_gone_for_good_ends_training_within_the_stated_wait(tiny_root, tmp_path):
    cache = tmp_path / "cache"
    backend = f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}"
    server = MlflowServer(tmp_path / "server", backend).start()
    try:
        env = {"MLFLOW_TRACKING_URI": server.uri, "FGVC_TRACKING_TIMEOUT_S": "5", "FGVC_CACHE_DIR": str(cache)}
        proc = subprocess.Popen([sys.executable, "-m", "fgvc.cli", "train", *TRAIN, "--epochs", "8",
                                 "--data-root", str(tiny_root)], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **env})
        run_id = _first_epoch_logged(MlflowClient(server.uri))
        os.killpg(server.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=120)
        exit_s = time.monotonic() - killed
    finally:
        server.stop()
    print(f"server killed after epoch 1; fgvc train exited {exit_s:.1f} s later (wait 5 s)")
    assert proc.returncode == 1
    line = one_error(err)
    assert f"tracking server {server.uri} unreachable" in line
    assert f"checkpoints are kept at {cache / 'checkpoints' / run_id}" in line and "--resume true" in line
    assert (cache / "checkpoints" / run_id / "last.pt").is_file()
    assert exit_s < 5 + 25, exit_s  # the wait, one request's own retries, writing the checkpoints

    # The server comes back: the run is resumed from the kept checkpoint and finishes.
    server = MlflowServer(tmp_path / "server", backend).start()
    try:
        began = time.monotonic()
        done = fgvc("train", *TRAIN, "--epochs", "8", "--data-root", str(tiny_root), "--resume", "true",
                    cwd=tmp_path, env={**env, "MLFLOW_TRACKING_URI": server.uri})
        print(f"resumed in {time.monotonic() - began:.1f} s")
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"resuming run {run_id}" in done.stderr
        client = MlflowClient(server.uri)
        assert client.get_run(run_id).info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "val/acc")] == list(range(1, 9))
        assert not [r for r in runs_of(client, "fgvc-train") if r.info.status == "RUNNING"]
    finally:
        server.stop()


def test_a_short_outage_is_waited_out_and_a_long_one_ends_in_one_line(monkeypatch):
    from mlflow.exceptions import MlflowException

    from fgvc.errors import TrackingUnreachable
    from fgvc.tracking.failures import Patience

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # give_up_quickly changes them
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    refused = MlflowException("API request to http://127.0.0.1:9/api/2.0/mlflow/runs/log-batch failed with "
                              "exception HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded "
                              "(Caused by NewConnectionError('Connection refused'))")
    answers = iter([refused, refused, "logged"])

    def log_epoch():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    patience = Patience(kept="the checkpoints are kept at /cache/run", budget_s=5, pause_s=0.05)
    assert patience.call("logging epoch 2", log_epoch) == "logged" and patience.down_since is None

    def always_refused():
        raise refused

    began = time.monotonic()
    patience = Patience(kept="the checkpoints are kept at /cache/run", budget_s=0.3, pause_s=0.05)
    with pytest.raises(TrackingUnreachable, match=r"unreachable for 0 s \(HTTPConnectionPool.*; the checkpoints "
                                                  r"are kept at /cache/run$"):
        patience.call("logging epoch 3", always_refused)
    assert time.monotonic() - began < 1 and patience.gave_up
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"  # what is left is tried once


# --- 2. a process killed during `register` -------------------------------------------------------

def _original_checkpoint(path: Path, num_classes: int = 3, poison: bool = False) -> Path:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    state = model.state_dict()
    if poison:
        state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save({"model": state, "num_classes": num_classes}, path)
    return path


def _wait_for(condition, timeout: float = 120, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(step)
    raise AssertionError("condition not met in time")


@pytest.mark.slow
def test_register_killed_is_closed_as_killed_when_run_again(tiny_root, mlflow_store, tmp_path):
    checkpoint = _original_checkpoint(tmp_path / "best_resnet18.pt")
    argv = [sys.executable, "-m", "fgvc.cli", "register", "--checkpoint", str(checkpoint), "--data-root",
            str(tiny_root), "--batch-size", "12"]
    proc = subprocess.Popen(argv, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient()

    def pending_model():
        with_models = [r for r in runs_of(client, "fgvc-train") if r.info.status == "RUNNING"]
        for run in with_models:
            models = client.search_logged_models([run.info.experiment_id],
                                                 filter_string=f"source_run_id = '{run.info.run_id}'")
            if any(m.status.name == "PENDING" for m in models):
                return run.info.run_id
        return None

    try:
        stale = _wait_for(pending_model, step=0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert client.get_run(stale).info.status == "RUNNING"

    began = time.monotonic()
    again = fgvc("register", *argv[4:], cwd=tmp_path)
    print(f"rerun of register: {time.monotonic() - began:.1f} s")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    notes = [line for line in again.stderr.splitlines() if stale in line]
    assert len(notes) == 1 and "closed it as KILLED" in notes[0] and f"process {proc.pid}" in notes[0]
    run = client.get_run(stale)
    assert run.info.status == "KILLED"
    assert f"its process {proc.pid} on " in run.data.tags["fgvc.end_reason"]
    assert "has exited" in run.data.tags["fgvc.end_reason"]
    runs = runs_of(client, "fgvc-train")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
    models = client.search_logged_models([runs[0].info.experiment_id])
    assert models and not [m for m in models if m.status.name == "PENDING"]


# --- 3. a full disk --------------------------------------------------------------------------------

@pytest.fixture()
def full_disk(tmp_path, monkeypatch):
    """A 1 MB tmpfs (as root), else writes of checkpoints that fail with ENOSPC."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr("fgvc.training.checkpoint.torch.save", no_space)
    try:
        yield mount
    finally:
        if done.returncode == 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _train_in_process(tiny_root, *extra: str):
    from click.testing import CliRunner

    from fgvc.cli import main

    return CliRunner().invoke(main, ["train", *TRAIN, "--epochs", "1", "--data-root", str(tiny_root),
                                     "--registered-model", "false", *extra])


@pytest.mark.slow
def test_full_checkpoint_disk_is_one_line_naming_the_file(tiny_root, mlflow_store, full_disk, monkeypatch):
    monkeypatch.setenv("FGVC_CACHE_DIR", str(full_disk))
    done = _train_in_process(tiny_root)
    assert done.exit_code == 1
    line = one_error(done.output)
    assert re.match(rf"Error: {re.escape(str(full_disk))}/checkpoints/[0-9a-f]{{32}}/(best|last)\.pt: cannot write "
                    r"the checkpoint: no space left on device \(needs about [\d.]+ MB", line), line
    assert "no earlier" in line and "free some space" in line
    (run,) = runs_of(MlflowClient(), "fgvc-train")
    assert run.info.status == "FAILED"
    assert run.data.tags["fgvc.error"] == line.removeprefix("Error: ")


@pytest.mark.slow
def test_full_artifact_store_is_one_line_and_keeps_the_checkpoints(tiny_root, mlflow_store, tmp_path, monkeypatch):
    artifacts = tmp_path / "mlruns"
    artifacts.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(artifacts)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs a small tmpfs (mount as root)")
    try:
        done = _train_in_process(tiny_root)
    finally:
        subprocess.run(["umount", "-l", str(artifacts)], capture_output=True)
    assert done.exit_code == 1
    line = one_error(done.output)
    assert "cannot write the checkpoint artifact: no space left on device" in line, line
    (run,) = runs_of(MlflowClient(), "fgvc-train")
    kept = Path(os.environ["FGVC_CACHE_DIR"]) / "checkpoints" / run.info.run_id
    assert f"the checkpoints are kept at {kept}" in line and (kept / "last.pt").is_file()
    assert run.info.status == "FAILED" and run.data.tags["fgvc.error"] == line.removeprefix("Error: ")


# --- 5. checkpoints: non-finite weights, zip bombs -------------------------------------------------

def _cli(*argv: str):
    from click.testing import CliRunner

    from fgvc.cli import main

    return CliRunner().invoke(main, list(argv))


def test_register_refuses_nan_weights_before_a_run_exists(tiny_root, mlflow_store, tmp_path):
    checkpoint = _original_checkpoint(tmp_path / "nan_resnet18.pt", poison=True)
    done = _cli("register", "--checkpoint", str(checkpoint), "--data-root", str(tiny_root))
    assert done.exit_code == 1
    line = one_error(done.output)
    assert line == (f"Error: {checkpoint}: refused: its weights are not finite (1 NaN/inf value in "
                    f"layer1.0.conv1.weight); a model built from them predicts NaN")
    assert runs_of(MlflowClient(), "fgvc-train") == []


def test_analyze_and_the_predictor_refuse_nan_weights():
    from fgvc.errors import FgvcError
    from fgvc.models.factory import create_model
    from fgvc.models.predict import model_from_checkpoint

    model = create_model("fn-small", num_classes=3, pretrained=False)
    state = model.state_dict()
    name = [k for k, v in state.items() if v.is_floating_point()][-1]
    state[name] = state[name].clone().fill_(float("inf"))
    with pytest.raises(FgvcError, match=rf"^models:/x/1: refused: its weights are not finite \(\d+ NaN/inf "
                                        rf"values? in {re.escape(name)}\)"):
        model_from_checkpoint({"model": state, "spec": model.spec.to_dict()}, "models:/x/1")


def test_a_checkpoint_that_inflates_beyond_its_size_is_refused_before_reading(tiny_root, tmp_path, monkeypatch):
    import zipfile

    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb/data.pkl", b"\0" * (80 << 20))  # 80 MB of zeros: ~80 KB compressed
    monkeypatch.setattr("fgvc.safeload.torch.load", lambda *a, **k: pytest.fail("torch.load was reached"))
    done = _cli("register", "--checkpoint", str(bomb), "--data-root", str(tiny_root))
    assert done.exit_code == 1
    line = one_error(done.output)
    assert line.startswith(f"Error: {bomb}: refused to load: the checkpoint's records inflate to 80.0 MB from 0.1 MB "
                           f"on disk"), line
    assert "FGVC_MAX_INFLATE_BYTES=67108864" in line


# --- 7. downloads capped ----------------------------------------------------------------------------

@pytest.fixture()
def loopback(tmp_path, monkeypatch):
    from http_fixture import LoopbackServer

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("FGVC_OFFLINE", "HF_HUB_OFFLINE", "http_proxy", "HTTP_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = LoopbackServer(deadline_s=60)
    yield server
    server.close()


def test_a_download_without_length_stops_at_the_stated_maximum(loopback, monkeypatch):
    from fgvc.models.weights import WeightsCorrupt, fetch_url, torch_hub_path

    monkeypatch.setenv("FGVC_MAX_DOWNLOAD_BYTES", str(3 << 20))
    url = loopback.serve("/files/huge-0123456789.pth", b"\0" * (8 << 20), mode="no_length")
    with pytest.raises(WeightsCorrupt, match=r"sent no length and passed FGVC_MAX_DOWNLOAD_BYTES=3145728 bytes; "
                                             r"it was stopped there; nothing was kept"):
        fetch_url(url, description="huge weights", progress=False)
    folder = torch_hub_path(url).parent
    assert not folder.exists() or not any(folder.iterdir())


def test_a_download_announcing_more_than_the_maximum_is_refused_unread(loopback, monkeypatch):
    from fgvc.models.weights import WeightsCorrupt, fetch_url

    monkeypatch.setenv("FGVC_MAX_DOWNLOAD_BYTES", "1000")
    url = loopback.serve("/files/big-0123456789.pth", b"\0" * 5000)
    with pytest.raises(WeightsCorrupt, match="announces 5000 bytes, more than FGVC_MAX_DOWNLOAD_BYTES=1000"):
        fetch_url(url, description="big weights", progress=False)


def test_a_download_without_length_under_the_maximum_is_kept(loopback):
    import hashlib

    from fgvc.models.weights import fetch_url

    data = b"weights" * 1000
    url = loopback.serve(f"/files/small-{hashlib.sha256(data).hexdigest()[:8]}.pth", data, mode="no_length")
    assert fetch_url(url, description="small weights", progress=False).read_bytes() == data


# --- 8. refusal hints quote the user's values --------------------------------------------------------

def test_a_suggested_command_quotes_the_users_value_for_a_shell(mlflow_store, tmp_path):
    import shlex

    root = str(tmp_path / "data $(touch pwned)")
    done = _cli("train", "--data-root", root, *TRAIN)
    assert done.exit_code == 1
    line = one_error(done.output)
    assert f"(run `fgvc prepare --root {shlex.quote(root)}` or" in line
    assert shlex.split(line.split("`")[1]) == ["fgvc", "prepare", "--root", root]
    assert not (tmp_path / "pwned").exists()


# --- 4. hostile sources for `prepare` ----------------------------------------------------------------

def _png(path: Path, size=(24, 32), colour=(200, 30, 30)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _ingest_within(source: Path, root: Path, timeout: float = 60) -> dict:
    """ingest() in a daemon thread: a hang fails the test instead of blocking it."""
    import threading

    from fgvc.data.ingest import ingest

    outcome: dict = {}

    def work():
        try:
            outcome["meta"] = ingest(source, root, height=32, width=24, progress=False, workers=1)
        except BaseException as error:  # noqa: BLE001 (handed to the test)
            outcome["error"] = error

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"ingest of {source} hung"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["meta"]


def test_folder_source_skips_what_is_not_a_regular_file_and_merges_unicode_twins(tmp_path, monkeypatch, caplog):
    source, outside = tmp_path / "source", tmp_path / "elsewhere"
    composed, decomposed = "Caf\u00e9", "Cafe\u0301"
    for designer in (composed, decomposed, "Zara", "ZARA"):
        for k in range(2):
            _png(source / designer / f"look{k}.png", colour=(40 * k, 90, 200))
    zara = source / "Zara"
    os.mkfifo(zara / "pipe.png")
    (zara / "zero.png").symlink_to("/dev/zero")
    (zara / "loop.png").symlink_to(zara / "loop.png")
    (zara / "outside.png").symlink_to(_png(outside / "secret.png"))
    _png(zara / "giant.png", size=(200, 150))
    monkeypatch.setenv("FGVC_MAX_IMAGE_PIXELS", "10000")
    caplog.set_level("WARNING", logger="fgvc")

    meta = _ingest_within(source, tmp_path / "root")
    reasons = {s["path"]: s["error"] for s in meta["skipped"]}
    assert reasons["Zara/pipe.png"] == "not a regular file: a FIFO (named pipe)"
    assert reasons["Zara/zero.png"] == "not a regular file: a character device (through a link to /dev/zero)"
    assert reasons["Zara/loop.png"] == "a symbolic link loop"
    assert reasons["Zara/outside.png"] == f"a link out of the source (to {outside / 'secret.png'})"
    assert reasons["Zara/giant.png"].startswith("ImageTooLarge: 200x150 = 30000 pixels, more than "
                                                "FGVC_MAX_IMAGE_PIXELS=10000; not decoded")
    assert len(reasons) == 5
    labels = json_load(tmp_path / "root" / "index_to_label.json")
    assert sorted(labels.values()) == sorted([composed, "ZARA", "Zara"])
    assert meta["num_classes"] == 3 and meta["class_counts"]["train"][composed] + \
        meta["class_counts"]["val"][composed] == 4
    assert meta["ignored"]["merged_designer_names"] == {composed: sorted([composed, decomposed])}
    text = caplog.text
    assert f"merged into one class '{composed}'" in text
    assert "'ZARA', 'Zara' differ only by case: kept as 2 classes" in text


def json_load(path: Path):
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def test_csv_row_naming_a_fifo_or_a_device_does_not_hang_prepare(tmp_path, mlflow_store):
    source = tmp_path / "source"
    rows = ["path,label"]
    for designer in ("Alaia", "Balmain"):
        for k in range(3):
            rows.append(f"{_png(source / designer / f'{k}.png', colour=(80 * k, 10, 90))},{designer}")
    os.mkfifo(source / "pipe.png")
    rows += [f"{source / 'pipe.png'},Alaia", "/dev/zero,Balmain"]
    csv_file = source / "list.csv"
    csv_file.write_text("\n".join(rows) + "\n")
    meta = _ingest_within(csv_file, tmp_path / "root")
    assert {s["path"]: s["error"] for s in meta["skipped"]} == {
        str(source / "pipe.png"): "not a regular file: a FIFO (named pipe)",
        "/dev/zero": "not a regular file: a character device"}
    assert meta["counts"]["train"] + meta["counts"]["val"] == 6


def test_the_default_pixel_budget_is_below_pillows():
    from PIL import Image

    from fgvc.data.source_checks import ImageTooLarge, max_image_pixels
    from fgvc.data.source_checks import check_image_size as check_pixels

    assert max_image_pixels() < Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLarge, match="12000x12000 = 144000000 pixels"):
        check_pixels((12000, 12000))  # a 1-bit PNG of this size is a few kB on disk, 1.7 GB as RGB


# --- 6. permissions on a basic-auth server ----------------------------------------------------------

PASSWORDS = {"admin": "fgvc-admin-password", "alice": "alice-password-123", "reader": "reader-password-123"}


@pytest.fixture(scope="module")
def read_only_server(tmp_path_factory):
    """`mlflow server --app-name basic-auth` on SQLite with docs/team.md's read-only setup:
    default_permission READ; alice (a writer) holds EDIT grants on the training experiment and the
    registered model; reader holds nothing beyond the default. One version of fgvc-fn-small exists."""
    import importlib.util

    if importlib.util.find_spec("flask_wtf") is None:
        pytest.skip("basic-auth needs Flask-WTF: pip install 'mlflow[auth]'")
    from mlflow.server import get_app_client

    workdir = tmp_path_factory.mktemp("auth-server")
    config = workdir / "basic_auth.ini"
    config.write_text("[mlflow]\ndefault_permission = READ\nadmin_username = admin\nauth_cache_ttl_seconds = 60\n"
                      f"database_uri = sqlite:///{workdir / 'auth.db'}\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORDS["admin"],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "fgvc-test-csrf-key"}
    with MlflowServer(workdir, f"sqlite:///{workdir / 'mlflow.db'}", app_name="basic-auth", env=env) as running:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            patch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORDS["admin"])
            auth = get_app_client("basic-auth", tracking_uri=running.uri)
            for user in ("alice", "reader"):
                auth.create_user(user, PASSWORDS[user])
            admin = MlflowClient(running.uri)
            experiment_id = admin.create_experiment("fgvc-train")
            admin.set_experiment_tag(experiment_id, "mlflow.note.content", "Training runs.")
            run = admin.create_run(experiment_id)
            admin.set_terminated(run.info.run_id)
            admin.create_registered_model("fgvc-fn-small")
            admin.create_model_version("fgvc-fn-small", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
            auth.grant_user_permission("alice", "experiment", experiment_id, "EDIT")
            auth.grant_user_permission("alice", "registered_model", "fgvc-fn-small", "EDIT")
        yield running


def _as_user(monkeypatch, server, user: str) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORDS[user])
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(server.uri)
    return MlflowClient(server.uri)


@pytest.mark.slow
def test_a_read_only_user_is_refused_training_in_one_line(read_only_server, tiny_root, monkeypatch):
    client = _as_user(monkeypatch, read_only_server, "reader")
    before = len(runs_of(client, "fgvc-train"))
    done = _train_in_process(tiny_root)
    assert done.exit_code == 1
    line = one_error(done.output)
    assert re.fullmatch(r"Error: permission denied: user reader may not call /api/2\.0/mlflow/runs/create on "
                        rf"experiment fgvc-train at {read_only_server.uri}; ask an admin for EDIT on it "
                        r"\(docs/team\.md, Permissions\)", line), line
    assert len(runs_of(client, "fgvc-train")) == before  # no run was created, none is left RUNNING


@pytest.mark.slow
def test_a_read_only_user_is_refused_promote_in_one_line_and_a_granted_writer_is_not(read_only_server, monkeypatch):
    client = _as_user(monkeypatch, read_only_server, "reader")
    done = _cli("promote", "--name", "fgvc-fn-small", "--version", "1")
    assert done.exit_code == 1
    line = one_error(done.output)
    assert re.fullmatch(r"Error: permission denied: user reader may not call "
                        r"/api/2\.0/mlflow/registered-models/alias on registered model fgvc-fn-small at "
                        rf"{read_only_server.uri}; .*", line), line
    assert client.get_registered_model("fgvc-fn-small").aliases == {}

    _as_user(monkeypatch, read_only_server, "alice")
    done = _cli("promote", "--name", "fgvc-fn-small", "--version", "1")
    assert done.exit_code == 0, done.output
    assert client.get_registered_model("fgvc-fn-small").aliases == {"champion": "1"}
    assert [r.info.status for r in runs_of(client, "fgvc-registry")] == ["FINISHED"]

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    done = _cli("promote", "--name", "fgvc-fn-small", "--version", "1")
    assert done.exit_code == 1
    assert one_error(done.output).startswith(f"Error: tracking server {read_only_server.uri} did not accept user "
                                             f"alice (")

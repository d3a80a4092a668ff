"""docs/team.md followed as written: a basic-auth server with READ as the default, the users and
the grant script taken from the page and run unchanged; then two granted writers train,
analyse and run a two-cell study together, and a reader is refused each write in one line
within seconds.

What the test changes from the page: the server's two databases are SQLite files in a
temporary directory instead of PostgreSQL (the page's `database_uri` line is replaced), the
port is a free one, and `default_permission` is READ as the page's Permissions section says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from server_utils import MlflowServer

from fgvc import mlflow_names

TEAM = Path(__file__).resolve().parents[1] / "docs" / "team.md"
FGVC = [sys.executable, "-m", "fgvc.cli"]


def page() -> str:
    return TEAM.read_text(encoding="utf-8")


def basic_auth_ini() -> str:
    """The server's basic_auth.ini as section 3 writes it."""
    return re.search(r"cat > basic_auth\.ini <<'EOF'\n(.*?)\nEOF\n", page(), re.S).group(1)


def users_script() -> str:
    """Section 4's script that creates the users (the admin's heredoc)."""
    users = page()[page().index("## 4. Users"):]
    return re.search(r"python - <<'EOF'\n(.*?)\nEOF\n", users, re.S).group(1)


def grant_script() -> str:
    """The Permissions section's grant_writers.py."""
    permissions = page()[page().index("### Permissions"):]
    return re.search(r"```python\n(.*?)```", permissions, re.S).group(1)


def admin_password() -> str:
    return re.search(r"export MLFLOW_AUTH_ADMIN_PASSWORD='([^']+)'", page()).group(1)


def passwords() -> dict[str, str]:
    return dict(re.findall(r'\("(\w+)", "([^"]+)"\)', users_script()))


def test_the_grant_script_names_every_experiment_fgvc_writes_to():
    named = re.search(r"experiments = \((.*?)\)\n", grant_script(), re.S).group(1)
    assert tuple(re.findall(r'"([^"]+)"', named)) == mlflow_names.WRITTEN
    assert "default_permission = READ" in page()[page().index("### Permissions"):]


@pytest.fixture(scope="module")
def team_server(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("flask_wtf") is None:
        pytest.skip("basic-auth needs Flask-WTF: pip install 'mlflow[auth]'")
    workdir = tmp_path_factory.mktemp("team-server")
    ini = basic_auth_ini()
    ini = ini.replace("default_permission = EDIT", "default_permission = READ")
    ini = re.sub(r"^database_uri = .*$", f"database_uri = sqlite:///{workdir / 'auth.db'}", ini, flags=re.M)
    (workdir / "basic_auth.ini").write_text(ini + "\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(workdir / "basic_auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password(),
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "fgvc-test-secret-key"}
    with MlflowServer(workdir, f"sqlite:///{workdir / 'mlflow.db'}", app_name="basic-auth", env=env) as server:
        admin = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "MLFLOW_TRACKING_USERNAME": "admin",
                 "MLFLOW_TRACKING_PASSWORD": admin_password()}
        for script in (users_script(), grant_script(), grant_script()):  # the grant script may run again
            done = subprocess.run([sys.executable, "-c", script], env=admin, capture_output=True, text=True,
                                  timeout=120)
            assert done.returncode == 0, done.stderr[-3000:]
        yield server


def as_user(server: MlflowServer, user: str, cwd: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": server.uri, "MLFLOW_TRACKING_USERNAME": user,
           "MLFLOW_TRACKING_PASSWORD": passwords()[user], "FGVC_CACHE_DIR": str(cwd / f"cache-{user}")}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def run_together(commands: list[tuple[str, list[str]]], server, cwd: Path, timeout: float = 300) -> list:
    """Each (user, argv) as `fgvc argv` in its own process, all at once; (returncode, stderr)."""
    procs = [subprocess.Popen([*FGVC, *argv], cwd=cwd, env=as_user(server, user, cwd), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for user, argv in commands]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        out.append((proc.returncode, stdout + stderr))
    return out


TRAIN = ["train", "--arch", "fn-small", "--epochs", "1", "--batch-size", "8", "--num-workers", "0"]
STUDY = ["study", "--archs", "fn-small", "--regimes", "unmasked", "--seeds", "0,1", "--epochs", "1",
         "--batch-size", "8", "--num-images", "4", "--num-workers", "0"]


@pytest.mark.slow
def test_two_writers_train_analyse_and_study_together_and_a_reader_is_refused_each_in_one_line(
        team_server, tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")  # the test looks as the admin
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin_password())
    client = MlflowClient(team_server.uri)
    data = ["--data-root", str(tiny_root)]

    trained = run_together([("alice", [*TRAIN, *data]), ("bob", [*TRAIN, *data])], team_server, tmp_path)
    assert all(code == 0 for code, _ in trained), trained
    versions = sorted(v.version for v in client.search_model_versions("name = 'fgvc-fn-small'"))
    assert versions == ["1", "2"]

    analysed = run_together([("alice", ["analyze", "--model", "models:/fgvc-fn-small/2", "--method", "gradcam",
                                        "--num-images", "4", *data]),
                             ("bob", ["analyze", "--model", "models:/fgvc-fn-small/1", "--method", "gradcam",
                                      "--num-images", "4", *data])], team_server, tmp_path)
    assert all(code == 0 for code, _ in analysed), analysed

    studied = run_together([("alice", [*STUDY, *data]), ("bob", [*STUDY, *data])], team_server, tmp_path)
    assert all(code == 0 for code, _ in studied), studied
    study = client.get_experiment_by_name(mlflow_names.STUDY).experiment_id
    cells = [r for r in client.search_runs([study]) if r.data.tags.get("fgvc.task") == "train"]
    assert sorted(r.data.tags["fgvc.study_cell"] for r in cells) == ["fn-small/unmasked/seed0",
                                                                     "fn-small/unmasked/seed1"]  # each once
    everything = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not [r for r in everything if r.info.status == "RUNNING"]

    # A refusal ends the command at once: within 5 s of what starting it takes on this machine
    # now (its imports; 5-8 s with the rest of the suite running), far from the retry window
    # (180 s) a retried refusal would wait out.
    began = time.monotonic()
    subprocess.run([sys.executable, "-c", "import fgvc.cli, fgvc.tasks.train, fgvc.tasks.analyze, fgvc.tasks.study"],
                   check=True, timeout=60)
    startup = time.monotonic() - began
    refusals = {}
    for argv in ([*TRAIN, *data], ["analyze", "--model", "models:/fgvc-fn-small/1", "--method", "gradcam",
                                   "--num-images", "4", *data], [*STUDY, *data]):
        began = time.monotonic()
        done = subprocess.run([*FGVC, *argv], cwd=tmp_path, env=as_user(team_server, "reader", tmp_path),
                              capture_output=True, text=True, timeout=60)
        seconds = time.monotonic() - began
        errors = [line for line in done.stderr.splitlines() if line.startswith("Error")]
        assert done.returncode == 1 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
        refusals[argv[0]] = (seconds, errors[0])
    print(f"starting a command (its imports): {startup:.1f} s")
    for command, (seconds, line) in refusals.items():
        print(f"reader's {command}: refused in {seconds:.1f} s: {line}")
    assert all(seconds < startup + 5 for seconds, _ in refusals.values()), (startup, refusals)
    tail = rf" at {re.escape(team_server.uri)}; ask an admin for EDIT on it \(docs/team\.md, Permissions\)"
    for command, call, resource in (("train", "runs/create", "experiment fgvc-train"),
                                    ("analyze", "runs/log-parameter", r"the claims ledger \(experiment fgvc-claims\)"),
                                    ("study", "runs/create", "experiment fgvc-study")):
        assert re.fullmatch(rf"Error: permission denied: user reader may not call /api/2\.0/mlflow/{call} on "
                            rf"{resource}{tail}", refusals[command][1]), refusals[command]
    after = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(after) == len(everything)  # the reader left nothing behind

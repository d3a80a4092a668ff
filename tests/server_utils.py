"""A throwaway PostgreSQL cluster and `mlflow server` for the integration tests.

Both run on 127.0.0.1 at free ports from a temporary directory and are stopped (and the
directory removed) on exit, also when the test fails. PostgreSQL refuses to run as root, so as
root the cluster belongs to the `postgres` user (Debian's postgresql package creates it).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

DB_USER = "mlflow"
DB_PASSWORD = "fgvc-test-db-password"


class Unavailable(RuntimeError):
    """What a test needs cannot run on this machine (the reason says what is missing)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin_dir() -> Path:
    """The directory of initdb/pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if versions:
        return Path(versions[-1]).parent
    raise Unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's "
                      "`postgresql` package (apt-get install -y postgresql)")


def sqlalchemy_driver() -> str:
    """The installed PostgreSQL driver as SQLAlchemy names it (SQLAlchemy 2.1 defaults to psycopg 3)."""
    for module, driver in (("psycopg2", "psycopg2"), ("psycopg", "psycopg")):
        if importlib.util.find_spec(module) is not None:
            return driver
    raise Unavailable("no PostgreSQL driver for SQLAlchemy: pip install psycopg2-binary")


class PostgresCluster:
    """`initdb` + `pg_ctl start` in a new temporary directory; a database per `create_database`.

    The directory is made directly under the system temporary directory, which the `postgres`
    user can reach (pytest's own temporary directories are private to the user running it).
    """

    def __init__(self):
        self.bin = postgres_bin_dir()
        self.driver = sqlalchemy_driver()
        self.workdir = Path(tempfile.mkdtemp(prefix="fgvc-postgres-"))
        self.port = free_port()
        self.data = self.workdir / "data"
        self.owner: str | None = None
        self.started = False

    def _as_owner(self, *cmd: str) -> list[str]:
        return ["runuser", "-u", self.owner, "--", *cmd] if self.owner else list(cmd)

    def _run(self, *cmd: str, timeout: float = 60) -> None:
        done = subprocess.run(self._as_owner(*cmd), capture_output=True, text=True, timeout=timeout,
                              cwd=self.workdir)
        if done.returncode != 0:
            raise Unavailable(f"PostgreSQL could not be started: `{' '.join(cmd)}` failed: "
                              f"{(done.stderr or done.stdout).strip()[-800:]}")

    def start(self) -> PostgresCluster:
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise Unavailable("running as root and there is no `postgres` user to own the "
                                  "cluster (it comes with Debian's postgresql package)") from None
            if shutil.which("runuser") is None:
                raise Unavailable("running as root and `runuser` is missing")
            self.owner = "postgres"
            shutil.chown(self.workdir, user=self.owner)
        password_file = self.workdir / "password"
        password_file.write_text(DB_PASSWORD + "\n")
        if self.owner:
            shutil.chown(password_file, user=self.owner)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", DB_USER, f"--pwfile={password_file}",
                  "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync")
        password_file.unlink()
        # fsync off: a test cluster trades durability for speed
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.workdir / "postgres.log"),
                  "-w", "-t", "60", "-o", f"-h 127.0.0.1 -p {self.port} -k {self.workdir} -c fsync=off", "start")
        self.started = True
        return self

    def create_database(self, name: str) -> str:
        """A new database; returns its SQLAlchemy URI."""
        env = {**os.environ, "PGPASSWORD": DB_PASSWORD}
        done = subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER,
                               name], capture_output=True, text=True, timeout=60, env=env)
        if done.returncode != 0:
            raise Unavailable(f"createdb {name} failed: {done.stderr.strip()}")
        return self.uri(name)

    def uri(self, database: str) -> str:
        return f"postgresql+{self.driver}://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if self.started:
            subprocess.run(self._as_owner(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                                          "-w", "-t", "30", "stop"), capture_output=True, timeout=60)
            self.started = False
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


class MlflowServer:
    """`mlflow server` with server-proxied artifacts, optionally with `--app-name basic-auth`."""

    def __init__(self, workdir: Path, backend_uri: str, app_name: str | None = None, env: dict | None = None):
        self.workdir = Path(workdir)
        self.backend_uri = backend_uri
        self.app_name = app_name
        self.env = env or {}
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts = self.workdir / "artifacts"
        self.log = self.workdir / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> MlflowServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
               "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1"]
        if self.app_name:
            cmd += ["--app-name", self.app_name]
        # The GenAI job runner (huey workers) is not needed here and costs a few processes.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.env}
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(name, None)
        with open(self.log, "w") as log:
            # Own process group: stop() ends the server and every worker it started.
            self.process = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer /health within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)
            except ProcessLookupError:
                pass
        if self.process is not None:  # workers left behind by a server that died first
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process = None

    def __enter__(self) -> MlflowServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

"""What a tracking server's failures become: a bounded wait, then one line.

- **Unreachable** (refused, timed out, DNS): every request retries for a few seconds (MLflow's
  ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``_BACKOFF_FACTOR`` / ``_BACKOFF_JITTER`` /
  ``_TIMEOUT``, which fgvc sets unless you do: 2 retries, factor 1, jitter 0.5, a timeout of a
  third of the wait, 10 to 120 s; MLflow's own defaults wait about 4 minutes per request). A
  training's per-epoch calls go through :class:`Patience`: they keep retrying until
  ``FGVC_TRACKING_TIMEOUT_S`` (default 180 s) has passed since the outage began, so a short
  outage pauses the training and does not stop it; a longer one ends it with one line saying
  where the checkpoints are kept and how to resume. After that, the process makes each remaining
  call once, without retries (:func:`give_up_quickly`).
- **Refused** (HTTP 401/403): one line naming the operation, the resource and the user.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import mlflow
import requests
from mlflow.exceptions import MlflowException

from fgvc.errors import FgvcError, PermissionDenied, TrackingUnreachable, first_line

log = logging.getLogger("fgvc")

TIMEOUT_ENV = "FGVC_TRACKING_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 180.0
T = TypeVar("T")

_UNREACHABLE = re.compile(r"Max retries exceeded|Connection refused|NewConnectionError|ConnectTimeout|"
                          r"ReadTimeout|failed with timeout exception|Failed to establish a new connection|"
                          r"RemoteDisconnected|Connection aborted|Name or service not known|"
                          r"Temporary failure in name resolution|ConnectionResetError", re.IGNORECASE)
_STATUS = re.compile(r"(?:error code|status(?: code)?|^)\s*(401|403)\b|\b(401|403) Client Error", re.IGNORECASE)
_ENDPOINT = re.compile(r"(?:endpoint|url:?)\s+(?:https?://[^/\s]+)?(/[^\s'\".]*(?:\.[^\s'\"]+)?)")
_resource: list[str] = []


def seconds_setting(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable `name` (unset: `default`);
    anything else is refused in one line naming it."""
    text = os.environ.get(name, "")
    try:
        value = float(text) if text else default
    except ValueError:
        raise FgvcError(f"{name}={text!r} is not a number of seconds") from None
    if value <= 0:
        raise FgvcError(f"{name}={text!r} must be positive")
    return value


def tracking_timeout_s() -> float:
    """The stated total wait for an unreachable tracking server, in seconds."""
    return seconds_setting(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


def bound_request_retries() -> None:
    """Give each MLflow request a few seconds of retries (unless the user chose otherwise)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.5")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(min(120, max(10, tracking_timeout_s() / 3)))))


_gave_up: list[bool] = []


def give_up_quickly() -> None:
    """After a long outage: every further request is tried once, with a short timeout."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"
    _gave_up.append(True)


def gave_up() -> bool:
    """Whether this process has given up on the tracking server (:func:`give_up_quickly`)."""
    return bool(_gave_up)


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def is_unreachable(error: BaseException) -> bool:
    if isinstance(error, TrackingUnreachable):
        return True
    if isinstance(error, (requests.ConnectionError, requests.Timeout)):
        return True
    return isinstance(error, MlflowException) and bool(_UNREACHABLE.search(str(error)))


def denied_status(error: BaseException) -> int | None:
    """401 or 403 when the server refused the request, else None."""
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return error.response.status_code if error.response.status_code in (401, 403) else None
    if not isinstance(error, MlflowException):
        return None
    code = getattr(error, "error_code", "")
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        return 403 if code == "PERMISSION_DENIED" else 401
    found = _STATUS.search(str(error))
    return int(found.group(1) or found.group(2)) if found else None


@contextlib.contextmanager
def acting_on(resource: str) -> Iterator[None]:
    """Name the resource (an experiment, a registered model) a refusal would concern: a
    refusal or an unreachable server inside the block is raised as one line naming it."""
    _resource.append(resource)
    try:
        yield
    except Exception as error:
        one_line = translated(error)
        if one_line is None or one_line is error:
            raise
        raise one_line from None
    finally:
        _resource.pop()


def permission_denied(error: BaseException, status: int) -> PermissionDenied:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or "(no MLFLOW_TRACKING_USERNAME)"
    found = _ENDPOINT.search(str(error))
    operation = found.group(1) if found else first_line(error)
    resource = f" on {_resource[-1]}" if _resource else ""
    if status == 401:
        return PermissionDenied(f"tracking server {tracking_uri()} did not accept user {user} ({operation}): "
                                f"check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    return PermissionDenied(f"permission denied: user {user} may not call {operation}{resource} at {tracking_uri()}; "
                            f"ask an admin for EDIT on it (docs/team.md, Permissions)")


def unreachable(error: BaseException, waited_s: float | None = None, kept: str = "") -> TrackingUnreachable:
    waited = f" for {waited_s:.0f} s" if waited_s is not None else ""
    cause = first_line(error)
    cause = re.sub(r"^API request to \S+ failed with (?:timeout )?exception\s*", "", cause)[:160]
    return TrackingUnreachable(f"tracking server {tracking_uri()} unreachable{waited} ({cause})"
                               + (f"; {kept}" if kept else ""))


def translated(error: BaseException) -> FgvcError | None:
    """The one-line error for a tracking failure a user can act on, else None."""
    if isinstance(error, FgvcError):
        return error
    status = denied_status(error)
    if status is not None:
        return permission_denied(error, status)
    if is_unreachable(error):
        return unreachable(error)
    return None


class Patience:
    """Calls that keep retrying while the tracking server is unreachable (pausing 1, 2, 4, ...
    up to ``pause_s`` seconds between tries), until ``budget_s`` has passed since the outage
    began; then :class:`TrackingUnreachable` with ``kept`` (what was kept, how to resume) in
    its message."""

    def __init__(self, kept: str = "", budget_s: float | None = None, pause_s: float = 5.0):
        self.kept = kept
        self.budget_s = tracking_timeout_s() if budget_s is None else budget_s
        self.pause_s = pause_s
        self.down_since: float | None = None
        self.gave_up = False

    def call(self, what: str, fn: Callable[..., T], *args, **kwargs) -> T:
        if self.gave_up:
            raise TrackingUnreachable(f"tracking server {tracking_uri()} unreachable; {self.kept}")
        pause = min(1.0, self.pause_s)
        while True:
            began = time.monotonic()
            try:
                result = fn(*args, **kwargs)
            except Exception as error:
                if not is_unreachable(error):
                    raise
                if self.down_since is None:
                    self.down_since = began
                    log.warning("tracking server %s unreachable while %s; retrying for up to %.0f s (%s)",
                                tracking_uri(), what, self.budget_s, TIMEOUT_ENV)
                waited = time.monotonic() - self.down_since
                if waited >= self.budget_s:
                    self.gave_up = True
                    give_up_quickly()
                    raise unreachable(error, waited, self.kept) from None
                time.sleep(min(pause, self.budget_s - waited))
                pause = min(2 * pause, self.pause_s)  # back off: 1, 2, 4, ... up to pause_s
                continue
            if self.down_since is not None:
                log.info("tracking server %s answers again after %.0f s", tracking_uri(),
                         time.monotonic() - self.down_since)
                self.down_since = None
            return result

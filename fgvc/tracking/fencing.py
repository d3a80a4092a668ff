"""Fencing: a process that holds a claim (fgvc.tracking.claims) writes results only while no
other process can have taken the claim over.

The holder's heartbeat thread records when it last sent a heartbeat that the tracking store
accepted. Another process takes a claim over only when that heartbeat is older than the stale
time (:func:`stale_after_s`), which exceeds this process's own give-up time
(:func:`give_up_after_s`, the tracking server's retry window ``FGVC_TRACKING_TIMEOUT_S``) by the
longest one request may take plus two heartbeats. So a holder whose last accepted heartbeat was
sent more than the give-up time ago may have lost its claim and must write nothing more; a
write it starts before that point ends (or fails) before any other process may take over. A
newer attempt on the ledger means the claim was taken over for certain.

:func:`ensure_held` is called before a holder writes results (each epoch's metrics and checkpoints,
the MLflow model, an analysis record, the end of a run); it raises :class:`ClaimLost`, one line,
and the run is left as it is (its new holder owns it).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

from fgvc.errors import ConfigError, FgvcError
from fgvc.tracking.failures import TIMEOUT_ENV, seconds_setting, tracking_timeout_s

HEARTBEAT_ENV, POLL_ENV, STALE_ENV = "FGVC_CLAIM_HEARTBEAT_S", "FGVC_CLAIM_POLL_S", "FGVC_CLAIM_STALE_S"


class ClaimLost(FgvcError):
    """This process may no longer hold the claim of the work it is doing: it stops, writing
    nothing more (another process may be doing the work now)."""


def heartbeat_s() -> float:
    """How often a holder renews its claim (``FGVC_CLAIM_HEARTBEAT_S``, 10 s)."""
    return seconds_setting(HEARTBEAT_ENV, 10.0)


def poll_s() -> float:
    """How often a waiter looks at the claim again (``FGVC_CLAIM_POLL_S``, 1 s)."""
    return seconds_setting(POLL_ENV, 1.0)


def give_up_after_s() -> float:
    """A holder that has had no heartbeat accepted for this long stops writing: the tracking
    server's retry window (``FGVC_TRACKING_TIMEOUT_S``), after which its training gives up too."""
    return tracking_timeout_s()


def request_s() -> float:
    """The longest one MLflow request may take: its timeout on every try, plus the back-off
    between tries (MLflow's ``MLFLOW_HTTP_REQUEST_*`` settings as this process runs them)."""
    def number(name: str, default: float) -> float:
        try:
            return float(os.environ.get(name) or default)
        except ValueError:
            return default

    timeout = number("MLFLOW_HTTP_REQUEST_TIMEOUT", 120)
    retries = int(number("MLFLOW_HTTP_REQUEST_MAX_RETRIES", 7))
    factor = number("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", 2)
    jitter = number("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", 1)
    return timeout * (retries + 1) + sum(factor * 2 ** k + jitter for k in range(retries))


def stale_after_s() -> float:
    """When a holder on another host counts as dead: no heartbeat for its give-up time, plus
    the longest request it may have started before giving up, plus two heartbeats.
    ``FGVC_CLAIM_STALE_S`` may make it longer, never shorter."""
    safe = give_up_after_s() + request_s() + 2 * heartbeat_s()
    if not os.environ.get(STALE_ENV):
        return safe
    chosen = seconds_setting(STALE_ENV, safe)
    if chosen < safe:
        raise ConfigError(f"{STALE_ENV}={chosen:g} is shorter than a holder's own give-up time {safe:.0f} s "
                          f"({TIMEOUT_ENV} {give_up_after_s():g} + one request {request_s():.0f} + two heartbeats "
                          f"{2 * heartbeat_s():g}): a live holder could be taken over; raise it or leave it unset")
    return chosen


@dataclass
class Held:
    """A claim this thread holds: its key, attempt, and when its last accepted heartbeat was
    sent (``time.monotonic()``)."""

    key: str
    attempt: int
    what: str
    confirmed: float = field(default_factory=time.monotonic)
    taken_by: str | None = None  # the holder of a newer attempt, once one is seen

    def lost(self, now: float | None = None) -> str | None:
        """Why this claim may be lost, or None while it is held."""
        if self.taken_by is not None:
            return f"{self.taken_by} took it over (attempt {self.attempt + 1})"
        quiet = (time.monotonic() if now is None else now) - self.confirmed
        limit = give_up_after_s()
        if quiet > limit:
            return (f"no heartbeat accepted for {quiet:.0f} s ({TIMEOUT_ENV}={limit:g}); another process may have "
                    f"taken it over")
        return None


_local = threading.local()


def held() -> list[Held]:
    """The claims this thread holds, outermost first."""
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def lost() -> tuple[Held, str] | None:
    """The first claim of this thread that may be lost, with why; None when all are held."""
    for claim in held():
        why = claim.lost()
        if why is not None:
            return claim, why
    return None


def ensure_held(doing: str = "writing results") -> None:
    """Raise :class:`ClaimLost` when this thread may have lost a claim it holds."""
    found = lost()
    if found is not None:
        claim, why = found
        raise ClaimLost(f"{claim.what or claim.key}: this process lost its claim (attempt {claim.attempt}): {why}; "
                        f"stopped before {doing}, writing nothing")

"""Pretrained weights, downloaded the standard way and used offline from the standard caches.

Two sources, two caches, the same ones torchvision, torch.hub and timm use:

* a URL (torchvision's weights, the DeepLabV3 segmenters, a timm model without a Hub id) lands
  in torch hub's cache, ``$TORCH_HOME/hub/checkpoints/<file name of the URL>``
  (:func:`fetch_url`). A hex suffix in the file name (``resnet18-f37072fd.pth``: at least 6 hex
  digits after the last ``-``) is a prefix of the file's sha256 and is checked;
* a Hugging Face Hub file (timm's weights) lands in the Hugging Face cache (:func:`fetch_hf`,
  :func:`fetch_timm_weights`).

A cached file is used without any network access. A download is streamed to a temporary file
beside its destination and renamed into place only once complete and hash-checked, so an
interrupted or corrupt download leaves nothing in the cache.

Environment, read at each call:

``FGVC_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``; also ``true`` / ``yes`` / ``on``)
    Never touch the network: a file that is not cached raises :class:`WeightsUnavailable` at once.
``FGVC_TORCH_MIRROR=https://mirror.example/models/``
    Download ``https://download.pytorch.org/models/<file>`` from ``<mirror>/<file>`` instead.
    The cache file name stays the torchvision one.
``FGVC_DOWNLOAD_TIMEOUT=SECONDS`` or ``CONNECT,READ``
    Give up on a host that does not answer within CONNECT seconds (DNS lookup and TCP connect;
    default 5) and on a download that receives nothing for READ seconds (default 30).
``FGVC_MAX_DOWNLOAD_BYTES=BYTES``
    The most a download may write (default 2 GiB; the largest standard weights are a few hundred
    MB). A response that announces more (``Content-Length``) is refused before its body is read;
    one without a length is cut off, and removed, once it passes the maximum.
``HF_ENDPOINT``, ``HF_HUB_CACHE``, ``HF_HOME``
    The Hub (or a mirror of it) and its cache folder, with huggingface_hub's meaning.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import socket
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import torch.hub
from tqdm import tqdm

from fgvc.errors import ConfigError, FgvcError, first_line

__all__ = [
    "TORCHVISION_MODELS_URL",
    "WeightsCorrupt",
    "WeightsError",
    "WeightsUnavailable",
    "download_timeouts",
    "fetch_hf",
    "fetch_timm_weights",
    "fetch_url",
    "hf_cache_dir",
    "hf_endpoint",
    "is_offline",
    "mirrored_url",
    "sha256_prefix",
    "torch_hub_path",
]

logger = logging.getLogger(__name__)

TORCHVISION_MODELS_URL = "https://download.pytorch.org/models/"
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
# timm's choice when a model's config names no Hub file: safetensors first, then the pickle.
TIMM_HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")
_CHUNK_BYTES = 1 << 20
DEFAULT_MAX_DOWNLOAD_BYTES = 2 << 30
_TRUTHY = {"1", "true", "yes", "on"}
# torch.hub's convention: "<name>-<sha256 prefix>.<ext>".
_HASH_SUFFIX = re.compile(r"-([0-9a-f]{6,64})\.[^-]*$")


class WeightsError(FgvcError):
    """Pretrained weights could not be provided; the message says which file and what to do."""


class WeightsUnavailable(WeightsError, FileNotFoundError):
    """The weights are not cached and cannot be downloaded (offline, unreachable, not on the server)."""


class WeightsCorrupt(WeightsError):
    """A download failed its checksum or was cut short; nothing was kept in the cache."""


class _NotInRepo(WeightsUnavailable):
    """The Hub repository has no file of that name (another candidate name may exist)."""


# --------------------------------------------------------------------------------------------
# Settings.
# --------------------------------------------------------------------------------------------

def _offline_switch() -> str | None:
    """The ``NAME=value`` that turns downloads off, or ``None`` when they are on."""
    for name in ("FGVC_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUTHY:
            return f"{name}={os.environ[name]}"
    return None


def is_offline() -> bool:
    """True when ``FGVC_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to a true value."""
    return _offline_switch() is not None


def download_timeouts() -> tuple[float, float]:
    """``(connect_s, read_s)`` from ``FGVC_DOWNLOAD_TIMEOUT`` (one number sets both)."""
    text = os.environ.get("FGVC_DOWNLOAD_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_READ_TIMEOUT_S
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) <= 0:
        raise ConfigError(f"FGVC_DOWNLOAD_TIMEOUT={text!r}: expected seconds > 0, one number for "
                          "both the connect and the read timeout or 'CONNECT,READ' (e.g. '5,30')")
    return values[0], values[-1]


def max_download_bytes() -> int:
    text = os.environ.get("FGVC_MAX_DOWNLOAD_BYTES", "").strip()
    if not text:
        return DEFAULT_MAX_DOWNLOAD_BYTES
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"FGVC_MAX_DOWNLOAD_BYTES={text!r}: expected a number of bytes > 0")
    return value


class _TooLarge(OSError):
    """A download passed the most it may write."""


def torch_hub_path(url: str) -> Path:
    """Where torch hub caches ``url``: ``$TORCH_HOME/hub/checkpoints/<file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlsplit(url).path)


def mirrored_url(url: str) -> str:
    """``url`` with the torchvision download prefix replaced by ``FGVC_TORCH_MIRROR``, if set."""
    mirror = os.environ.get("FGVC_TORCH_MIRROR", "").strip()
    if not mirror or not url.startswith(TORCHVISION_MODELS_URL):
        return url
    return mirror.rstrip("/") + "/" + url[len(TORCHVISION_MODELS_URL):]


def sha256_prefix(url: str) -> str | None:
    """The sha256 prefix a torch-hub style file name carries, or ``None``."""
    match = _HASH_SUFFIX.search(os.path.basename(urlsplit(url).path))
    return match.group(1) if match else None


# --------------------------------------------------------------------------------------------
# The network.
# --------------------------------------------------------------------------------------------

def _reason(error: BaseException, timeout_s: float) -> str:
    """One phrase for why a request failed."""
    if isinstance(error, urllib.error.HTTPError):
        return f"the server answered HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError) and isinstance(error.reason, BaseException):
        error = error.reason
    if isinstance(error, socket.gaierror):
        return f"host name lookup failed: {error.strerror or error}"
    if isinstance(error, TimeoutError):
        return f"nothing received for {timeout_s:g} s"
    return str(error) or type(error).__name__


def _unreachable(url: str, timeout_s: float) -> str | None:
    """Why the host of ``url`` (or its proxy) cannot be reached within ``timeout_s``, or ``None``.

    The DNS lookup has no timeout of its own, so the lookup and the connect run in a daemon
    thread that is abandoned after ``timeout_s``: an unreachable network fails within seconds.
    """
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(error)

    worker = threading.Thread(target=connect, name=f"fgvc-reach-{host}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        return f"no answer from {host}:{port} within {timeout_s:g} s"
    error = outcome[0]
    return None if error is None else f"cannot connect to {host}:{port} ({_reason(error, timeout_s)})"


def _copy_body(response, out, size: int | None, *, name: str, progress: bool, limit: int | None = None) -> str:
    """Stream a response body into ``out``, at most ``limit`` bytes (else :class:`_TooLarge`);
    returns the sha256 hex digest of what was written."""
    digest = hashlib.sha256()
    written = 0
    with tqdm(total=size, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
              disable=None if progress else True) as bar:
        while chunk := response.read(_CHUNK_BYTES):
            written += len(chunk)
            if limit is not None and written > limit:
                raise _TooLarge(f"passed {limit} bytes")
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _save_to_cache(response, target: Path, expected_sha: str | None, *, source: str,
                   description: str, read_s: float, progress: bool) -> None:
    """Write a response into ``target`` through a temporary file in the same folder, renamed
    into place only when its length and checksum are right."""
    def corrupt(what: str) -> WeightsCorrupt:
        return WeightsCorrupt(f"{description}: the download of {source} {what}; nothing was kept in "
                              f"{target.parent} (the partial file was removed). Run again to retry.")

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{uuid.uuid4().hex[:12]}.partial")
    length = response.headers.get("Content-Length")
    size = int(length) if length and length.isdigit() else None
    limit = max_download_bytes()
    if size is not None and size > limit:
        response.close()
        raise corrupt(f"announces {size} bytes, more than FGVC_MAX_DOWNLOAD_BYTES={limit}")
    try:
        with response, open(partial, "xb") as out:
            try:
                digest = _copy_body(response, out, size, name=target.name, progress=progress,
                                    limit=size if size is not None else limit)
            except _TooLarge:
                raise corrupt(f"sent no length and passed FGVC_MAX_DOWNLOAD_BYTES={limit} bytes; it was "
                              f"stopped there") from None
            except (OSError, http.client.HTTPException) as error:
                raise corrupt(f"was interrupted after {out.tell()} bytes "
                              f"({_reason(error, read_s)})") from error
            received = out.tell()
        if size is not None and received != size:
            raise corrupt(f"ended after {received} of {size} bytes")
        if expected_sha is not None and not digest.startswith(expected_sha):
            raise corrupt(f"does not match its checksum: sha256 {digest[:16]}..., the file name "
                          f"promises {expected_sha}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Public entry points.
# --------------------------------------------------------------------------------------------

def _network_or_raise(url: str, unavailable) -> float:
    """Before any download: refuse at once when offline or when `url`'s host cannot be
    reached within the connect timeout (raising ``unavailable(reason)``); returns the read
    timeout to download with."""
    switch = _offline_switch()
    if switch:
        raise unavailable(f"downloads are off ({switch})")
    connect_s, read_s = download_timeouts()
    problem = _unreachable(url, connect_s)
    if problem:
        raise unavailable(problem)
    return read_s


def fetch_url(url: str, *, description: str, progress: bool = True) -> Path:
    """The torch hub cache file of ``url``, downloaded first if it is not there.

    ``description`` names the weights in messages (e.g. ``"ResNet18_Weights.IMAGENET1K_V1"``).
    Raises :class:`WeightsUnavailable` (offline, unreachable, not on the server) or
    :class:`WeightsCorrupt` (bad checksum, cut short); neither leaves a file in the cache.
    """
    target = torch_hub_path(url)
    if target.is_file():
        return target
    source = mirrored_url(url)

    def unavailable(reason: str) -> WeightsUnavailable:
        via = f" (mirror of {url})" if source != url else ""
        mirror = ("" if not url.startswith(TORCHVISION_MODELS_URL)
                  else ", check the mirror set by FGVC_TORCH_MIRROR" if via
                  else f", set FGVC_TORCH_MIRROR to a mirror of {TORCHVISION_MODELS_URL}")
        return WeightsUnavailable(
            f"{description}: cannot download {source}{via}: {reason}. The file is expected at "
            f"{target}. To provide it: copy the file to that path{mirror}, or pass an explicit "
            "weights file.")

    read_s = _network_or_raise(source, unavailable)
    request = urllib.request.Request(source, headers={"User-Agent": "fgvc"})
    try:
        response = urllib.request.urlopen(request, timeout=read_s)
    except (OSError, http.client.HTTPException) as error:
        raise unavailable(_reason(error, read_s)) from error
    logger.info("Downloading %s from %s to %s", description, source, target)
    _save_to_cache(response, target, sha256_prefix(url), source=source, description=description,
                   read_s=read_s, progress=progress)
    return target


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` (``~/.cache/huggingface/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")).expanduser() / "hub"


def hf_endpoint() -> str:
    """The Hub to download from: ``HF_ENDPOINT`` (a mirror), else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")


def _hf_cached(repo_id: str, filename: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=hf_cache_dir(), revision=revision)
    return Path(found) if isinstance(found, str) else None


def fetch_hf(repo_id: str, filename: str, *, revision: str | None = None) -> Path:
    """The Hugging Face cache file ``filename`` of model repository ``repo_id``, downloaded
    first (from ``HF_ENDPOINT``) if it is not cached. Raises like :func:`fetch_url`."""
    cached = _hf_cached(repo_id, filename, revision)
    if cached is not None:
        return cached
    from huggingface_hub import errors as hub
    from huggingface_hub import hf_hub_download

    cache, endpoint = hf_cache_dir(), hf_endpoint()
    source = f"{endpoint}/{repo_id}/resolve/{revision or 'main'}/{filename}"
    folder = cache / ("models--" + repo_id.replace("/", "--"))

    def unavailable(reason: str, kind: type[WeightsUnavailable] = WeightsUnavailable):
        return kind(
            f"{repo_id}: cannot download {filename} from {source}: {reason}. The file is expected "
            f"in the Hugging Face cache {folder}. To provide it: copy that folder from a machine "
            f"where `hf download {repo_id} {filename}` ran (with HF_HUB_CACHE={cache}), set "
            "HF_ENDPOINT to a Hub mirror, or pass an explicit weights file.")

    read_s = _network_or_raise(endpoint, unavailable)
    transfer_failed: tuple[type[BaseException], ...] = (OSError, *_hub_transport_errors())
    try:
        found = hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache,
                                endpoint=endpoint, etag_timeout=read_s)
    except hub.RemoteEntryNotFoundError as error:
        raise unavailable(f"the repository has no file {filename}", _NotInRepo) from error
    except (hub.HfHubHTTPError, hub.LocalEntryNotFoundError) as error:
        raise unavailable(first_line(error)) from error
    except transfer_failed as error:
        raise WeightsCorrupt(f"{repo_id}: the download of {filename} from {source} failed "
                             f"({first_line(error)}); nothing was kept in {folder}. Run again "
                             "to retry.") from error
    return Path(found)


def fetch_timm_weights(model_name: str) -> Path | None:
    """The weights file of timm model ``model_name`` (a tag is allowed: ``resnet18.a1_in1k``),
    from the caches or downloaded; ``None`` when timm knows no pretrained weights for it.

    The source is timm's pretrained config: its Hub repository (``hf_hub_filename``, else
    ``model.safetensors`` then ``pytorch_model.bin``), or else its plain URL.
    """
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        return None
    # timm also takes a url as (url, cache file name); the file is downloaded from the url either way.
    url = cfg.url[0] if isinstance(cfg.url, tuple) else cfg.url
    if not cfg.hf_hub_id:
        return fetch_url(url, description=f"timm {model_name} weights") if url else None
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else TIMM_HUB_FILENAMES
    cached = [_hf_cached(repo_id, name, revision or None) for name in names]
    if url:  # timm's older downloads went to the torch hub cache
        cached.append(torch_hub_path(url))
    found = next((path for path in cached if path is not None and path.is_file()), None)
    return found or _fetch_first_hf_file(repo_id, names, revision or None)


def _fetch_first_hf_file(repo_id: str, names: tuple[str, ...], revision: str | None) -> Path:
    """The first of ``names`` the repository has (a missing name is skipped, any other error raised)."""
    for name in names[:-1]:
        try:
            return fetch_hf(repo_id, name, revision=revision)
        except _NotInRepo:
            continue
    return fetch_hf(repo_id, names[-1], revision=revision)


def _hub_transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection errors (huggingface_hub 2.x talks through httpx2)."""
    try:
        import httpx2
    except ImportError:
        return ()
    return (httpx2.TransportError,)

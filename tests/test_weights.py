"""fgvc.models.weights: cache first, hash-checked downloads, fast and clear offline errors.

Every download comes from a loopback server; a guard fails the test if anything tries to reach
another host (a real host name would otherwise fail quietly into an "unavailable" error).
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from http_fixture import LoopbackServer

from fgvc.models import weights
from fgvc.models.weights import (
    WeightsCorrupt,
    WeightsUnavailable,
    download_timeouts,
    fetch_hf,
    fetch_timm_weights,
    fetch_url,
    is_offline,
    torch_hub_path,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _is_loopback(host) -> bool:
    if host in (None, "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Refuse, and record, any connection or name lookup that is not loopback."""
    refused: list[str] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def check(address):
        if isinstance(address, tuple) and not _is_loopback(address[0]):
            refused.append(str(address[0]))
            raise ConnectionRefusedError(f"test guard: no connection to {address[0]} allowed")

    def connect(sock, address):
        check(address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        check(address)
        return real_connect_ex(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host):
            refused.append(str(host))
            raise socket.gaierror(socket.EAI_NONAME, f"test guard: no lookup of {host} allowed")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield refused
    assert not refused, f"a test tried to reach non-loopback hosts: {refused}"


@pytest.fixture(autouse=True)
def weights_env(tmp_path, monkeypatch):
    """Empty caches in tmp_path, downloads allowed, every download host on loopback."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    for name in ("FGVC_OFFLINE", "HF_HUB_OFFLINE", "FGVC_DOWNLOAD_TIMEOUT", "http_proxy", "https_proxy",
                 "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    closed = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("FGVC_TORCH_MIRROR", closed + "/models/")
    monkeypatch.setenv("HF_ENDPOINT", closed)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import (conftest sets it for the suite).
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture()
def server():
    loopback = LoopbackServer(deadline_s=60)
    yield loopback
    loopback.close()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _state_dict_bytes() -> tuple[dict[str, torch.Tensor], bytes]:
    state = {"conv.weight": torch.arange(24, dtype=torch.float32).view(2, 3, 2, 2),
             "fc.bias": torch.tensor([0.5, -1.0])}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return state, buffer.getvalue()


def _hashed_name(data: bytes, stem: str = "tiny") -> str:
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# --------------------------------------------------------------------------------------------
# Settings.
# --------------------------------------------------------------------------------------------

def test_torch_hub_path_follows_torch_home(tmp_path):
    url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert torch_hub_path(url) == tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert weights.sha256_prefix(url) == "f37072fd"
    assert weights.sha256_prefix("https://example.org/model.pth") is None


@pytest.mark.parametrize("name, value", [("FGVC_OFFLINE", "1"), ("FGVC_OFFLINE", "true"),
                                         ("HF_HUB_OFFLINE", "YES")])
def test_offline_switches(monkeypatch, name, value):
    assert not is_offline()
    monkeypatch.setenv(name, value)
    assert is_offline()
    monkeypatch.setenv(name, "0")
    assert not is_offline()


def test_download_timeout_setting(monkeypatch):
    assert download_timeouts() == (5.0, 30.0)
    monkeypatch.setenv("FGVC_DOWNLOAD_TIMEOUT", "2.5")
    assert download_timeouts() == (2.5, 2.5)
    monkeypatch.setenv("FGVC_DOWNLOAD_TIMEOUT", "3,60")
    assert download_timeouts() == (3.0, 60.0)
    monkeypatch.setenv("FGVC_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(weights.ConfigError, match="FGVC_DOWNLOAD_TIMEOUT='soon'"):
        download_timeouts()


# --------------------------------------------------------------------------------------------
# fetch_url.
# --------------------------------------------------------------------------------------------

def test_download_lands_in_the_cache_and_is_read_from_it_next_time(server):
    state, data = _state_dict_bytes()
    name = _hashed_name(data)
    url = server.serve(f"/files/{name}", data)
    path = fetch_url(url, description="tiny weights", progress=False)
    assert path == torch_hub_path(url) and path.name == name
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert _leftovers(path.parent) == [name]
    assert server.count(f"/files/{name}") == 1
    assert fetch_url(url, description="tiny weights", progress=False) == path
    assert server.count(f"/files/{name}") == 1


def test_mirror_redirects_torchvision_urls_and_keeps_the_cache_name(server, monkeypatch):
    _, data = _state_dict_bytes()
    name = _hashed_name(data, "resnet18")
    server.serve(f"/mirror/models/{name}", data)
    monkeypatch.setenv("FGVC_TORCH_MIRROR", server.url("/mirror/models"))  # no trailing slash
    url = f"https://download.pytorch.org/models/{name}"
    assert weights.mirrored_url(url) == server.url(f"/mirror/models/{name}")
    path = fetch_url(url, description="ResNet18 weights", progress=False)
    assert path == torch_hub_path(url) and path.name == name and path.read_bytes() == data
    assert server.count(f"/mirror/models/{name}") == 1


@pytest.mark.parametrize("mode, name_of", [
    ("normal", lambda data: "tiny-00000000.pth"),  # the file name promises another hash
    ("wrong", _hashed_name),                        # the server sends other bytes
])
def test_checksum_mismatch_leaves_nothing(server, mode, name_of):
    _, data = _state_dict_bytes()
    name = name_of(data)
    url = server.serve(f"/files/{name}", data, mode=mode)
    with pytest.raises(WeightsCorrupt, match="does not match its checksum") as error:
        fetch_url(url, description="tiny weights", progress=False)
    assert url in str(error.value) and "nothing was kept" in str(error.value)
    assert _leftovers(torch_hub_path(url).parent) == []


@pytest.mark.parametrize("mode, error_type, message", [
    ("truncated", WeightsCorrupt, "ended after"),
    ("stall_body", WeightsCorrupt, "was interrupted after"),
    ("stall", WeightsUnavailable, "nothing received for 0.5 s"),
])
def test_broken_transfers_fail_in_bounded_time_and_leave_nothing(server, monkeypatch, mode, error_type,
                                                                 message):
    monkeypatch.setenv("FGVC_DOWNLOAD_TIMEOUT", "2,0.5")
    _, data = _state_dict_bytes()
    url = server.serve(f"/files/{_hashed_name(data)}", data, mode=mode)
    start = time.monotonic()
    with pytest.raises(error_type, match=message) as error:
        fetch_url(url, description="tiny weights", progress=False)
    assert time.monotonic() - start < 3
    assert url in str(error.value) and str(torch_hub_path(url).parent) in str(error.value)
    assert _leftovers(torch_hub_path(url).parent) == []


def test_missing_file_on_the_server_is_unavailable(server):
    url = server.url("/files/absent-0123abcd.pth")
    with pytest.raises(WeightsUnavailable, match="HTTP 404"):
        fetch_url(url, description="tiny weights", progress=False)
    assert _leftovers(torch_hub_path(url).parent) == []


@pytest.mark.parametrize("switch", ["FGVC_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_raises_at_once_without_contacting_the_server(server, monkeypatch, switch):
    _, data = _state_dict_bytes()
    name = _hashed_name(data, "resnet18")
    server.serve(f"/models/{name}", data)
    monkeypatch.setenv("FGVC_TORCH_MIRROR", server.url("/models/"))
    monkeypatch.setenv(switch, "1")
    url = f"https://download.pytorch.org/models/{name}"
    start = time.monotonic()
    with pytest.raises(WeightsUnavailable) as error:
        fetch_url(url, description="ResNet18_Weights.IMAGENET1K_V1", progress=False)
    assert time.monotonic() - start < 0.5
    message = str(error.value)
    assert server.count(f"/models/{name}") == 0
    assert f"downloads are off ({switch}=1)" in message
    assert url in message and str(torch_hub_path(url)) in message
    assert "copy the file to that path" in message and "FGVC_TORCH_MIRROR" in message
    assert "explicit weights file" in message


def test_offline_still_serves_the_cache(monkeypatch):
    url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    torch_hub_path(url).parent.mkdir(parents=True)
    torch_hub_path(url).write_bytes(b"cached")
    monkeypatch.setenv("FGVC_OFFLINE", "1")
    assert fetch_url(url, description="ResNet18 weights").read_bytes() == b"cached"


def test_refused_connection_fails_fast():
    url = f"http://127.0.0.1:{_closed_port()}/models/tiny-0123abcd.pth"
    start = time.monotonic()
    with pytest.raises(WeightsUnavailable, match="cannot connect to 127.0.0.1") as error:
        fetch_url(url, description="tiny weights", progress=False)
    assert time.monotonic() - start < 2
    assert str(torch_hub_path(url)) in str(error.value)


def test_failed_name_lookup_fails_fast(no_internet):
    with pytest.raises(WeightsUnavailable, match="host name lookup failed"):
        fetch_url("https://weights.invalid/tiny-0123abcd.pth", description="tiny weights")
    assert no_internet == ["weights.invalid"]  # the guard saw it: this lookup was meant to fail
    no_internet.clear()


def test_hung_name_lookup_is_abandoned_after_the_connect_timeout(monkeypatch):
    monkeypatch.setenv("FGVC_DOWNLOAD_TIMEOUT", "0.3,5")
    release = threading.Event()

    def hung_lookup(host, *args, **kwargs):
        release.wait(10)
        raise socket.gaierror(socket.EAI_AGAIN, "resolver gave up")

    monkeypatch.setattr(socket, "getaddrinfo", hung_lookup)
    start = time.monotonic()
    try:
        with pytest.raises(WeightsUnavailable, match=r"no answer from slow\.example:443 within 0.3 s"):
            fetch_url("https://slow.example/tiny-0123abcd.pth", description="tiny weights")
        assert time.monotonic() - start < 1.5
    finally:
        release.set()


# --------------------------------------------------------------------------------------------
# The Hugging Face hub.
# --------------------------------------------------------------------------------------------

def _serve_hub_file(server: LoopbackServer, repo_id: str, filename: str, data: bytes) -> str:
    """What huggingface_hub needs from /resolve/: an ETag, the commit and the size (and the body)."""
    path = f"/{repo_id}/resolve/main/{filename}"
    server.serve(path, data, headers={"ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                      "X-Repo-Commit": COMMIT})
    return path


def _hide_hub_file(server: LoopbackServer, repo_id: str, filename: str) -> str:
    path = f"/{repo_id}/resolve/main/{filename}"
    server.serve(path, b"", status=404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
    return path


def test_hub_download_lands_in_the_hf_cache_and_is_read_from_it_next_time(server, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", server.base_url)
    _, data = _state_dict_bytes()
    route = _serve_hub_file(server, "org/tiny-net", "pytorch_model.bin", data)
    path = fetch_hf("org/tiny-net", "pytorch_model.bin")
    assert path.is_relative_to(tmp_path / "hf" / "models--org--tiny-net" / "snapshots" / COMMIT)
    assert path.read_bytes() == data
    requests = server.count(route)
    assert requests >= 1
    assert fetch_hf("org/tiny-net", "pytorch_model.bin") == path
    monkeypatch.setenv("FGVC_OFFLINE", "1")
    assert fetch_hf("org/tiny-net", "pytorch_model.bin") == path
    assert server.count(route) == requests


def test_timm_weights_fall_back_from_safetensors_to_the_pickle(server, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.base_url)
    state, data = _state_dict_bytes()
    repo_id = "timm/resnet18.tv_in1k"  # timm's pretrained cfg of resnet18.tv_in1k
    hidden = _hide_hub_file(server, repo_id, "model.safetensors")
    served = _serve_hub_file(server, repo_id, "pytorch_model.bin", data)
    path = fetch_timm_weights("resnet18.tv_in1k")
    assert path.name == "pytorch_model.bin"
    assert torch.equal(torch.load(path, weights_only=True)["fc.bias"], state["fc.bias"])
    assert server.count(hidden) >= 1 and server.count(served) >= 1
    before = dict(server.requests)
    assert fetch_timm_weights("resnet18.tv_in1k") == path
    assert dict(server.requests) == before


def test_timm_model_without_weights_gives_none():
    import fgvc.models  # noqa: F401  (registers fashionnet_small with timm)

    assert fetch_timm_weights("fashionnet_small") is None


@pytest.mark.parametrize("switch", ["FGVC_OFFLINE", "HF_HUB_OFFLINE"])
def test_hub_offline_raises_at_once_naming_repo_file_and_cache(server, monkeypatch, tmp_path, switch):
    monkeypatch.setenv("HF_ENDPOINT", server.base_url)
    route = _serve_hub_file(server, "org/tiny-net", "model.safetensors", b"weights")
    monkeypatch.setenv(switch, "1")
    start = time.monotonic()
    with pytest.raises(WeightsUnavailable) as error:
        fetch_hf("org/tiny-net", "model.safetensors")
    assert time.monotonic() - start < 0.5
    message = str(error.value)
    assert server.count(route) == 0
    assert "org/tiny-net" in message and "model.safetensors" in message
    assert str(tmp_path / "hf" / "models--org--tiny-net") in message and "HF_ENDPOINT" in message


def test_unreachable_hub_fails_fast():
    start = time.monotonic()
    with pytest.raises(WeightsUnavailable, match="cannot connect to 127.0.0.1"):
        fetch_hf("org/tiny-net", "model.safetensors")
    assert time.monotonic() - start < 2


def test_missing_hub_file_is_unavailable(server, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.base_url)
    _hide_hub_file(server, "org/tiny-net", "model.safetensors")
    with pytest.raises(WeightsUnavailable, match="the repository has no file model.safetensors"):
        fetch_hf("org/tiny-net", "model.safetensors")


def test_timm_weights_come_from_the_torch_hub_cache_too(monkeypatch):
    url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"  # resnet18.tv_in1k's cfg.url
    torch_hub_path(url).parent.mkdir(parents=True)
    torch_hub_path(url).write_bytes(b"cached")
    monkeypatch.setenv("FGVC_OFFLINE", "1")
    assert fetch_timm_weights("resnet18.tv_in1k") == torch_hub_path(url)


def test_timm_url_given_with_its_cache_file_name_is_read_by_its_url(monkeypatch):
    """timm also takes a pretrained cfg's url as (url, cache file name)."""
    import timm
    from timm.models import PretrainedCfg

    url = "https://example.org/weights/tiny-net-0123abcd.pth"
    cfg = PretrainedCfg(url=(url, "tiny-net.pth"))
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: cfg)
    torch_hub_path(url).parent.mkdir(parents=True, exist_ok=True)
    torch_hub_path(url).write_bytes(b"cached")
    monkeypatch.setenv("FGVC_OFFLINE", "1")
    assert fetch_timm_weights("tiny-net") == torch_hub_path(url)


def test_loopback_server_stops_itself_after_its_deadline():
    loopback = LoopbackServer(deadline_s=0.2)
    url = loopback.serve("/files/a.bin", b"abc", mode="stall")
    assert loopback.closed.wait(3), "the deadline did not stop the server"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", urlsplit(url).port), timeout=1).close()

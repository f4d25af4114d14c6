"""pytest fixture ``hub_server``: a :class:`tests.hub_server.HubServer` on 127.0.0.1 that the real
``huggingface_hub`` / ``datasets`` clients of this process talk to for the duration of one test.

Use it with ``from tests.hub_fixtures import hub_server  # noqa: F401`` in a test module.

What the fixture configures (all through ``monkeypatch``, so everything is restored afterwards and the
rest of the suite stays offline, as ``tests/conftest.py`` wants):

- environment: ``HF_ENDPOINT``, a fake ``HF_TOKEN``, ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_DATASETS_CACHE``
  under ``tmp_path``, ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` removed;
- the values both libraries read from the environment *at import time* (setting the environment alone
  is not enough once they are imported): ``huggingface_hub.constants.ENDPOINT``,
  ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_HUB_OFFLINE``, cache paths, timeouts; ``datasets.config.HF_ENDPOINT``,
  ``HUB_DATASETS_URL``, ``HF_HUB_OFFLINE``, cache paths, ``HF_UPDATE_DOWNLOAD_COUNTS`` (off: it would
  call an S3 bucket); transformers' shared ``HfApi`` (``transformers.utils.hub._hf_api``) is dropped;
- ``datasets.config.STREAMING_*`` retry settings are snapshot and restored, since
  ``hf_streamlm.data.sources.apply_network_settings`` changes them process-wide.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.hub_server import HubServer

STREAMING_SETTINGS = (
    "STREAMING_READ_MAX_RETRIES",
    "STREAMING_READ_RETRY_INTERVAL",
    "STREAMING_READ_SERVER_UNAVAILABLE_RETRY_INTERVAL",
    "STREAMING_READ_RATE_LIMIT_RETRY_INTERVAL",
    "STREAMING_OPEN_MAX_RETRIES",
    "STREAMING_OPEN_RETRY_INTERVAL",
)


def point_clients_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path, timeout: float = 10) -> None:
    """Configure ``huggingface_hub`` and ``datasets`` (already imported or not) to use ``endpoint``
    online, with caches under ``home``."""
    import datasets.config as dcfg
    import huggingface_hub.constants as hcst

    endpoint = endpoint.rstrip("/")
    home = Path(home)
    hub_cache, datasets_cache = home / "hub", home / "datasets"
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_ETAG_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": "hf_local_test_token",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_DATASETS_CACHE": str(datasets_cache),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DOWNLOAD_TIMEOUT": str(int(timeout)),
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    for name, value in {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_PROGRESS_BARS": True,
        "HF_HUB_DOWNLOAD_TIMEOUT": timeout,
        "HF_HUB_ETAG_TIMEOUT": timeout,
    }.items():
        if hasattr(hcst, name):
            monkeypatch.setattr(hcst, name, value)

    for name, value in {
        "HF_ENDPOINT": endpoint,
        "HUB_DATASETS_URL": endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_HUB_OFFLINE": False,
        "HF_DATASETS_OFFLINE": False,
        "HF_UPDATE_DOWNLOAD_COUNTS": False,
        "HF_CACHE_HOME": str(home),
        "HF_DATASETS_CACHE": datasets_cache,
        "HF_MODULES_CACHE": home / "modules",
        "DOWNLOADED_DATASETS_PATH": str(datasets_cache / "downloads"),
        "EXTRACTED_DATASETS_PATH": str(datasets_cache / "downloads" / "extracted"),
    }.items():
        if hasattr(dcfg, name):
            monkeypatch.setattr(dcfg, name, value)
    for name in STREAMING_SETTINGS:  # restored at teardown whatever the test (or hf_streamlm) sets
        monkeypatch.setattr(dcfg, name, getattr(dcfg, name))
    # transformers keeps one HfApi per process, with the endpoint of the moment it was made: a new one
    # for this endpoint (else from_pretrained lists a stopped server's files, retrying for ~45 s)
    hub = sys.modules.get("transformers.utils.hub")
    if hub is not None and hasattr(hub, "_hf_api"):
        monkeypatch.setattr(hub, "_hf_api", None)


def set_read_timeout(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The read timeout of ``huggingface_hub`` downloads (``HfFileSystem`` ranged GETs: what dataset
    streaming uses) and HEAD calls, for one test."""
    import huggingface_hub.constants as hcst

    monkeypatch.setattr(hcst, "HF_HUB_DOWNLOAD_TIMEOUT", seconds)
    monkeypatch.setattr(hcst, "HF_HUB_ETAG_TIMEOUT", seconds)


def serve(server: HubServer, tmp_path, monkeypatch):
    """Start ``server`` (a :class:`HubServer` or a subclass), point the clients at it, yield it, stop it: the body
    of a fixture."""
    server.start()
    point_clients_at(monkeypatch, server.url, tmp_path / "hf_home")
    try:
        yield server
    finally:
        server.stop()
        # fsspec caches HfFileSystem instances (one per endpoint); drop the ones of this server
        from huggingface_hub import HfFileSystem

        HfFileSystem.clear_instance_cache()


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A running :class:`HubServer` rooted at ``tmp_path/"hub"``; clients point at it."""
    yield from serve(HubServer(tmp_path / "hub"), tmp_path, monkeypatch)


__all__ = ["hub_server", "point_clients_at", "serve", "set_read_timeout"]

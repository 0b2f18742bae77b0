"""Session fixtures for a REAL local vLLM server (one per test session, started lazily).

tests/conftest.py imports them: ``from vllm_fixtures import *  # noqa: F403``.

- ``anyio_backend`` is session-scoped ("asyncio"): async fixtures wider than a function need a
  runner of that scope, so every anyio test of the session shares one event loop (the
  deployment's pooled httpx client lives on it).
- ``vllm_deployment`` is function-scoped: ``create_or_get`` hands back the running server, or
  starts a new one if a test deleted it. Which weights it serves is whatever the last hotload
  left: a test that needs known weights hotloads a base first.
- The server is stopped (its whole process group) when the session ends.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from asyncrl.sync.deployment import Deployment, DeploymentConfig, DeploymentManager

__all__ = [
    "anyio_backend",
    "vllm_config",
    "vllm_deployment",
    "vllm_manager",
    "vllm_model_dir",
    "vllm_snapshot_root",
]

VLLM_MAX_MODEL_LEN = 1024


def _require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2 model (seed 0) the server starts from."""
    from asyncrl.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("vllm-model") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def vllm_snapshot_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The only directory the server may hotload snapshots from."""
    return tmp_path_factory.mktemp("vllm-snapshots")


@pytest.fixture(scope="session")
def vllm_config(
    vllm_model_dir: Path, vllm_snapshot_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> DeploymentConfig:
    _require_vllm()
    return DeploymentConfig(
        model_dir=vllm_model_dir,
        snapshot_root=vllm_snapshot_root,
        max_model_len=VLLM_MAX_MODEL_LEN,
        kv_cache_gib=1,
        enforce_eager=True,
        log_dir=tmp_path_factory.mktemp("vllm-logs"),
        startup_timeout_s=420.0,
        stop_grace_s=10.0,
    )


@pytest.fixture(scope="session")
async def vllm_manager() -> AsyncIterator[DeploymentManager]:
    """One manager for the session; closing it stops every server it started."""
    async with DeploymentManager() as manager:
        yield manager


@pytest.fixture
async def vllm_deployment(
    vllm_manager: DeploymentManager, vllm_config: DeploymentConfig
) -> Deployment:
    """The session's server, ready (started on first use, restarted if a test deleted it)."""
    return await vllm_manager.create_or_get(vllm_config)

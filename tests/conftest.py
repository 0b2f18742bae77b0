"""Shared fixtures: tiny locally made models (made once per test session)."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that stop the shared vLLM server run last, so the others share one start."""
    items.sort(key=lambda item: "leaves_no_process" in item.name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from asyncrl.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", preset="tiny", seed=0)

# real vLLM server fixtures (session-scoped, started on first use, always stopped)
from vllm_fixtures import *  # noqa: E402, F403

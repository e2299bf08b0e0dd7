"""Shared fixtures: one local Ray instance per test session, small GeoText-format corpora written on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import make_geotext_corpus

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session():
    """A 2-CPU local Ray instance shared by every integration test (starting one costs ~5 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 2**20,
                 log_to_driver=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture
def geotext_corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    make_geotext_corpus(root)
    return root

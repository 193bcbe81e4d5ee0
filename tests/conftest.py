import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # deterministic and fair to the 2-core CI machine


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own decode cache, so tests never see each other's files."""
    if "LOWBIT_CACHE" not in os.environ or os.environ.get("LOWBIT_TEST_SHARED_CACHE") != "1":
        monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def shared_data() -> Path:
    """The real data sets (../shared/data), found only through $LOWBIT_DATA."""
    root = os.environ.get("LOWBIT_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("set LOWBIT_DATA to the shared data folder to run this test")
    return Path(root)

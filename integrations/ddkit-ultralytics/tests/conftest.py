"""Offline, one thread, Ultralytics' settings in a temporary folder (set before Ultralytics is imported)."""
from __future__ import annotations

import os
import tempfile

os.environ["YOLO_OFFLINE"] = "1"  # no network here: Ultralytics must not try to download fonts or weights
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="ultralytics-cfg-"))
os.environ.setdefault("YOLO_VERBOSE", "False")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """A shared 2-core machine: one intra-op thread avoids oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

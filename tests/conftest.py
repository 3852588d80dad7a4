from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread avoids OpenMP oversubscription on a shared 2-core machine. A module opts in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def example_plugin_path(tmp_path_factory) -> Path:
    """The test plugin package installed (with real entry-point metadata) into a folder of its own."""
    target = tmp_path_factory.mktemp("example_plugin")
    # a copy: setuptools builds in the source folder, which the test workers (pytest -n) would share
    source = tmp_path_factory.mktemp("example_plugin_src") / "plugin_pkg"
    shutil.copytree(REPO / "tests" / "plugin_pkg", source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(source)],
                   check=True, cwd=source.parent, capture_output=True)
    return target


@pytest.fixture
def with_example_plugin(example_plugin_path, monkeypatch):
    """Put the installed example plugin on sys.path (and PYTHONPATH for subprocesses) for one test."""
    monkeypatch.syspath_prepend(str(example_plugin_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(example_plugin_path),
                                                                    os.environ.get("PYTHONPATH")])))
    import importlib

    importlib.invalidate_caches()
    yield example_plugin_path
    for name in [m for m in sys.modules if m.startswith("ddkit_example_plugin")]:
        del sys.modules[name]


@pytest.fixture
def train_calls(monkeypatch) -> dict[str, tuple[list, dict]]:
    """What ``ddkit run`` gives each stage's training, filled as the stages run: ``{stage folder name: (train sets,
    train block)}``; the training itself runs as it would."""
    from ddkit.engine import run as run_module

    seen: dict[str, tuple[list, dict]] = {}
    real = run_module.train_model

    def recording(task, model, train_sets, cfg_train, run_dir, **kw):
        seen[Path(run_dir).name] = (list(train_sets), dict(cfg_train))
        return real(task, model, train_sets, cfg_train, run_dir, **kw)

    monkeypatch.setattr(run_module, "train_model", recording)
    return seen

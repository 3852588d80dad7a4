"""A broken third-party plugin gives one line naming it, its distribution and DDKIT_DISABLE_PLUGINS, not a
traceback; ``ddkit plugins`` still lists the others. The distribution here is a hand-written ``.dist-info`` folder
on ``sys.path`` (real entry-point metadata, nothing installed)."""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
import textwrap
from pathlib import Path

import pytest

from ddkit import PluginError, hookimpl
from ddkit import plugin_manager
from ddkit.cli import main
from ddkit.plugin_manager import make_plugin_manager, registry_from_plugin_manager
from ddkit.types import AggregatorSpec, SelectorSpec

GOOD = """
from ddkit import hookimpl
from ddkit.types import SelectorSpec

class Keep:
    needs_labeled_stats = False

@hookimpl
def ddkit_selectors():
    yield SelectorSpec(name="zz_keep_all", factory=Keep, summary="keeps everything")
"""


@pytest.fixture
def fake_dist(tmp_path, monkeypatch) -> Path:
    """Distribution ``zz-broken-dist`` 0.3 with entry points ``zz_good`` (fine) and ``zz_broken`` (fails to import)."""
    pkg = tmp_path / "zz_fake_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text(textwrap.dedent(GOOD))
    (pkg / "broken.py").write_text("import zz_module_that_does_not_exist\n")
    info = tmp_path / "zz_broken_dist-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: zz-broken-dist\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[ddkit]\nzz_good = zz_fake_plugin.good\nzz_broken = zz_fake_plugin.broken\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("zz_fake_plugin")]:
        del sys.modules[name]


def test_an_entry_point_that_fails_to_import_is_one_line_naming_it(fake_dist):
    with pytest.raises(PluginError) as err:
        make_plugin_manager()
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("plugin entry point 'zz_broken' (distribution zz-broken-dist 0.3) failed to import: "
                          "ModuleNotFoundError: No module named 'zz_module_that_does_not_exist'")
    assert msg.endswith("DDKIT_DISABLE_PLUGINS=zz_broken")


def test_blocking_the_broken_one_keeps_the_rest_with_their_distribution(fake_dist, monkeypatch):
    monkeypatch.setenv("DDKIT_DISABLE_PLUGINS", "zz_broken")
    entry = registry_from_plugin_manager(make_plugin_manager()).get("selectors", "zz_keep_all")
    assert (entry.provider, entry.plugin) == ("zz-broken-dist", "zz_good")


def test_a_collecting_caller_gets_the_rest_and_the_reason(fake_dist):
    broken: dict[str, str] = {}
    registry = registry_from_plugin_manager(make_plugin_manager(broken=broken), broken=broken)
    assert "zz_keep_all" in registry.names("selectors") and "hflip" in registry.names("transforms")
    assert list(broken) == ["zz_broken"] and "failed to import" in broken["zz_broken"]


def test_ddkit_plugins_lists_the_rest_and_shows_the_broken_one(fake_dist, capsys):
    assert main(["plugins", "--kind", "selectors"]) == 2
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["zz_keep_all", "[zz-broken-dist]"] for line in out.splitlines())
    assert "broken plugins (1)" in out and "'zz_broken' (distribution zz-broken-dist 0.3) failed to import" in out


def test_other_commands_stop_in_one_line(fake_dist, capsys, monkeypatch):
    monkeypatch.setattr(plugin_manager, "_registry", None)
    assert main(["config", "show", "configs/mnist_dd.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "DDKIT_DISABLE_PLUGINS=zz_broken" in err


class HookRaises:
    @hookimpl
    def ddkit_models(self):
        raise RuntimeError("no licence file")


class ReturnsOneSpec:
    @hookimpl
    def ddkit_selectors(self):
        return SelectorSpec(name="zz_single", factory=object)


class MisspeltHook:
    @hookimpl
    def ddkit_aggregator(self):  # the hook is ddkit_aggregators
        return []


class _NotADataclass:
    margin: float = 0.5


@dataclass
class _UnresolvedHints:
    thing: "NameOnlyImportedUnderTypeChecking | None" = None  # noqa: F821


class BadSpecFields:
    @hookimpl
    def ddkit_aggregators(self):
        yield AggregatorSpec(name="zz_agg_prob", factory=object, input="prob")


class ParamsNotADataclass:
    @hookimpl
    def ddkit_selectors(self):
        yield SelectorSpec(name="zz_sel_nodc", factory=object, params=_NotADataclass)


class ParamsHintsDoNotResolve:
    @hookimpl
    def ddkit_selectors(self):
        yield SelectorSpec(name="zz_sel_fwd", factory=object, params=_UnresolvedHints)


@pytest.mark.parametrize("plugin, words", [
    (BadSpecFields(), ["aggregator 'zz_agg_prob': input must be one of instances, heatmaps, probs, got 'prob'"]),
    (ParamsNotADataclass(), ["selector 'zz_sel_nodc': params must be a dataclass type"]),
    (ParamsHintsDoNotResolve(), ["selector 'zz_sel_fwd': the type hints of params _UnresolvedHints do not resolve",
                                 "NameError"]),
    (HookRaises(), ["ddkit_models raised RuntimeError: no licence file"]),
    (ReturnsOneSpec(), ["ddkit_selectors must yield SelectorSpec objects", "got a single SelectorSpec"]),
    (MisspeltHook(), ["unknown hook 'ddkit_aggregator'", "Did you mean 'ddkit_aggregators'?",
                      "Valid hooks: ddkit_aggregators, ddkit_datasets"]),
])
def test_a_broken_registration_hook_is_one_line_naming_the_plugin(plugin, words):
    pm = make_plugin_manager([plugin], load_entry_points=False)
    name = pm.get_name(plugin)
    with pytest.raises(PluginError) as err:
        registry_from_plugin_manager(pm)
    msg = str(err.value)
    assert "\n" not in msg and f"plugin {name!r}" in msg.lower() and msg.endswith(f"DDKIT_DISABLE_PLUGINS={name}")
    for word in words:
        assert word in msg
    broken: dict[str, str] = {}
    registry_from_plugin_manager(pm, broken=broken)
    assert list(broken) == [name]

"""The plugin system: discovery through entry points, blocking, clashes, and the registry's errors."""
from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass
from typing import Literal

import pytest
import torch

import ddkit
from ddkit import ConfigError, PluginClashError, UnknownStrategyError
from ddkit.plugin_manager import make_plugin_manager, registry_from_plugin_manager
from ddkit.registry import Entry, Registry
from ddkit.types import KINDS, AggregatorSpec, TransformSpec


def test_builtins_come_from_entry_points_of_the_ddkit_distribution():
    registry = registry_from_plugin_manager(make_plugin_manager())
    for kind in KINDS:
        entries = registry.entries(kind)
        assert any(e.provider == "ddkit" for e in entries), f"no builtin {kind}"
        # ddkit's own strategies come through its builtin_* entry points; any other entry is another
        # distribution's (the YOLO plugin that `make` installs), never ddkit's
        assert all((e.provider == "ddkit") == e.plugin.startswith("builtin_") for e in entries)


def test_no_plugins_without_entry_points():
    registry = registry_from_plugin_manager(make_plugin_manager(load_entry_points=False))
    assert all(not registry.names(kind) for kind in KINDS)


def test_builtin_package_name_is_unambiguous():
    import ddkit_plugins

    assert ddkit_plugins.__name__ == "ddkit_plugins"
    assert ddkit_plugins.__file__.replace("\\", "/").endswith("plugins/__init__.py")


def test_disable_builtins_by_entry_point_name(monkeypatch):
    monkeypatch.setenv("DDKIT_DISABLE_PLUGINS", "builtin_aggregators, builtin_keypoint_fusion, builtin_losses")
    registry = registry_from_plugin_manager(make_plugin_manager())
    assert registry.names("aggregators") == []
    # what stays of the losses comes from other plugins (e.g. an installed ddkit-ultralytics' yolo_kd)
    assert all(not e.plugin.startswith("builtin_") for e in registry.entries("losses"))
    assert registry.names("transforms")


def test_third_party_plugin_is_discovered_with_its_provider(with_example_plugin, monkeypatch):
    monkeypatch.setenv("DDKIT_DISABLE_PLUGINS", "example_clash")
    registry = registry_from_plugin_manager(make_plugin_manager())
    entry = registry.get("aggregators", "best_per_class")
    assert entry.provider == "ddkit-example-plugin" and entry.plugin == "example"
    agg = registry.build("aggregators", {"name": "best_per_class", "min_score": 0.5})
    assert agg.min_score == 0.5


def test_environment_names_the_distribution_and_version_of_each_strategy_a_recipe_uses(with_example_plugin,
                                                                                     monkeypatch):
    """A run's environment.json: which plugin release supplied each strategy, the packages (each provider's own
    run-time requirements too), the CPU kernels torch picked, and the variables that change the arithmetic."""
    from ddkit.engine.environment import describe_environment

    monkeypatch.setenv("DDKIT_DISABLE_PLUGINS", "example_clash")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    registry = registry_from_plugin_manager(make_plugin_manager())
    recipe = {"task": {"name": "detection"}, "label": {"aggregator": {"name": "best_per_class"},
                                                       "transforms": [{"name": "identity"}, {"name": "hflip"}]},
              "data": {"dataset": {"name": "yolo", "root": "x"}}}
    env = describe_environment(recipe, registry)
    ddkit_version = env["packages"]["ddkit"]
    yolo = registry.get("datasets", "yolo").provider
    assert env["strategies"] == {"aggregators.best_per_class": "ddkit-example-plugin 0.1.0",
                                 "datasets.yolo": f"{yolo} {env['packages'][yolo]}",  # not the yolo model plugin
                                 "tasks.detection": f"ddkit {ddkit_version}",
                                 "transforms.hflip": f"ddkit {ddkit_version}",
                                 "transforms.identity": f"ddkit {ddkit_version}"}
    assert env["packages"]["ddkit-example-plugin"] == "0.1.0" and env["packages"]["torch"] == torch.__version__.split("+")[0]
    assert env["packages"]["pycocotools"]  # a requirement of ddkit's, recorded with its version
    assert env["cwd"] == os.getcwd()  # the command's relative paths are relative to it
    assert env["torch"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    from ddkit.engine.environment import NUMERIC_ENV

    assert env["env"] == {k: os.environ[k] for k in NUMERIC_ENV if k in os.environ}  # e.g. ATEN_CPU_CAPABILITY
    assert env["env"]["OMP_NUM_THREADS"] == "1" and env["env"]["DDKIT_DISABLE_PLUGINS"] == "example_clash"


def test_third_party_plugin_can_be_blocked(with_example_plugin, monkeypatch):
    monkeypatch.setenv("DDKIT_DISABLE_PLUGINS", "example,example_clash")
    registry = registry_from_plugin_manager(make_plugin_manager())
    assert "best_per_class" not in registry.names("aggregators")


def test_clash_names_both_providers(with_example_plugin):
    with pytest.raises(PluginClashError) as err:
        registry_from_plugin_manager(make_plugin_manager())
    msg = str(err.value)
    assert "'identity'" in msg and "ddkit-example-plugin" in msg and "(from ddkit)" in msg
    assert "DDKIT_DISABLE_PLUGINS" in msg


@dataclass
class _Params:
    iou_thr: float = 0.55
    conf_type: Literal["avg", "max"] = "avg"
    weights: list[float] | None = None
    top: int = 3


def _toy_registry() -> Registry:
    def factory(**kw):
        return kw

    reg = Registry()
    for name in ("wbf", "nms", "soft_nms"):
        reg.add(Entry(AggregatorSpec(name=name, factory=factory, params=_Params, summary="s"), "pkg", "p"))
    return reg


def test_build_fills_defaults_and_validates():
    reg = _toy_registry()
    assert reg.build("aggregator", {"name": "wbf", "iou_thr": 0.7}) == {
        "iou_thr": 0.7, "conf_type": "avg", "weights": None, "top": 3}
    assert reg.build("aggregators", "nms")["iou_thr"] == 0.55  # a bare name is a block
    assert reg.build("aggregators", {"name": "wbf", "iou_thr": 1})["iou_thr"] == 1  # int where float is fine


def test_unknown_name_suggests_closest_and_lists_all():
    with pytest.raises(UnknownStrategyError) as err:
        _toy_registry().build("aggregators", {"name": "wfb"})
    assert str(err.value) == "Unknown aggregator 'wfb'. Did you mean 'wbf'? Available: nms, soft_nms, wbf"


@pytest.mark.parametrize("block, words", [
    ({"name": "wbf", "iou": 0.5}, ["unknown key 'iou'", "Did you mean 'iou_thr'", "Valid keys: iou_thr"]),
    ({"name": "wbf", "iou_thr": "high"}, ["'iou_thr' = 'high'", "float"]),
    ({"name": "wbf", "conf_type": "mean"}, ["'conf_type' = 'mean'", "Literal"]),
    ({"name": "wbf", "weights": [1, "a"]}, ["'weights'"]),
    ({"name": "wbf", "top": 2.5}, ["'top' = 2.5", "int"]),
    ({"name": "wbf", "top": True}, ["'top' = True", "int"]),
    ({"iou_thr": 0.5}, ["needs a 'name' key"]),
])
def test_bad_blocks_name_the_key(block, words):
    with pytest.raises(ConfigError) as err:
        _toy_registry().build("aggregators", block, where="r.yaml: label.aggregator")
    msg = str(err.value)
    assert msg.startswith("r.yaml: label.aggregator")
    for word in words:
        assert word in msg


def test_params_post_init_errors_become_config_errors():
    @dataclass
    class P:
        k: int = 1

        def __post_init__(self):
            if self.k < 1:
                raise ValueError("k must be >= 1")

    reg = Registry([Entry(TransformSpec(name="t", factory=lambda k: k, params=P, summary="s"), "x", "x")])
    with pytest.raises(ConfigError, match="transform 't': k must be >= 1"):
        reg.build("transforms", {"name": "t", "k": 0})


def test_unknown_kind():
    with pytest.raises(ConfigError, match="Unknown strategy kind 'aggregatorz'"):
        _toy_registry().names("aggregatorz")


def test_spec_of_wrong_type_is_rejected():
    import pluggy

    from ddkit import hookimpl

    class Bad:
        @hookimpl
        def ddkit_transforms(self):
            yield AggregatorSpec(name="x", factory=int, summary="s")

    pm = make_plugin_manager([Bad()], load_entry_points=False)
    assert isinstance(pm, pluggy.PluginManager)
    with pytest.raises(PluginClashError, match="must yield TransformSpec"):
        registry_from_plugin_manager(pm)


SINGULAR = {"transforms": "transform", "aggregators": "aggregator", "selectors": "selector", "losses": "loss",
            "tasks": "task", "datasets": "dataset", "models": "model"}


@pytest.mark.parametrize("kind", KINDS)
def test_messages_name_one_strategy_in_the_singular(kind):
    """Every kind's noun in the messages is its singular (``losses`` -> ``loss``, not ``losse``)."""
    with pytest.raises(UnknownStrategyError, match=f"^Unknown {SINGULAR[kind]} 'no_such_name'"):
        ddkit.build(kind, {"name": "no_such_name"})


def test_a_model_plugin_explains_a_foreign_file_in_the_checkpoint_refusal(tmp_path):
    """``ModelSpec.explain_file``: the core asks each model plugin how it loads a file that is not a ddkit
    checkpoint and puts the first answer in its one-line refusal (no plugin knows it: the generic hint)."""
    import pickle

    from ddkit.engine.checkpoint import PASS_INSTEAD, load_checkpoint
    from ddkit.errors import DataError
    from ddkit.types import ModelSpec

    path = tmp_path / "foreign.pt"
    path.write_bytes(pickle.dumps(Entry, protocol=2))  # a pickled class: weights_only refuses it

    def spec(name, explain):
        return Entry(ModelSpec(name=name, factory=dict, explain_file=explain), "x", "x")

    reg = Registry([spec("a", lambda p: None), spec("b", lambda p: f"load {p.name} with model b")])
    with pytest.raises(DataError, match=r"foreign.pt: cannot load: .*; load foreign.pt with model b$"):
        load_checkpoint(path, registry=reg)
    with pytest.raises(DataError) as err:
        load_checkpoint(path, registry=Registry([spec("a", lambda p: None)]))
    assert str(err.value).endswith(PASS_INSTEAD)


def test_a_model_plugin_opens_a_foreign_file_only_when_the_user_trusts_it(tmp_path):
    """``ModelSpec.open_file`` may run code from the file: ``load_model`` asks it only with ``trust_foreign`` (and
    only for a file that is not a ddkit checkpoint); without, the refusal names the caller's way to trust the file,
    when the plugin that explains it can open it."""
    import pickle

    from ddkit.engine.checkpoint import load_model, save_model
    from ddkit.errors import DataError
    from ddkit.testing.models import info_for_task
    from ddkit.types import ModelSpec

    path = tmp_path / "foreign.pt"
    path.write_bytes(pickle.dumps(Entry, protocol=2))  # a pickled class: weights_only refuses it
    info = info_for_task("classification")
    asked = []

    def open_file(p):
        asked.append(p)
        return ("classification", {"name": "mlp", "hidden": [4]}, info) if p == path else None

    def registry(**fields):
        fake = Entry(ModelSpec(name="fake", factory=dict, explain_file=lambda p: f"{p.name} is fake", **fields),
                     "x", "x")
        return Registry([*ddkit.get_registry().entries(), fake])

    reg = registry(open_file=open_file)
    with pytest.raises(DataError, match=r"foreign.pt is fake; or pass --trust it$"):
        load_model(path, registry=reg, trust_hint="pass --trust it")
    with pytest.raises(DataError, match=r"foreign.pt is fake$"):  # a caller with no way to trust a file
        load_model(path, registry=reg)
    with pytest.raises(DataError, match=r"foreign.pt is fake$"):  # a plugin that only explains the file
        load_model(path, registry=registry(), trust_hint="pass --trust it", trust_foreign=True)
    assert asked == []
    task, model, opened = load_model(path, registry=reg, trust_foreign=True)
    assert asked == [path] and task.name == "classification" and opened is info and not model.training
    save_model(model, tmp_path / "model.pt")
    load_model(tmp_path / "model.pt", registry=reg, trust_foreign=True)  # a ddkit checkpoint: never asked
    assert asked == [path]


def test_a_corrupt_file_is_not_called_a_file_of_python_objects(tmp_path):
    """Random bytes and a cut torch file fail torch's weights-only loader too, but they are damaged files, not
    pickles of classes: the refusal says so (it said "it holds Python objects")."""
    import pickle
    import random

    import torch

    from ddkit.engine.checkpoint import load_checkpoint
    from ddkit.errors import DataError

    torch.save({"w": torch.zeros(1000)}, tmp_path / "good.pt")
    files = {"random.pt": random.Random(0).randbytes(5000), "text.pt": b"hello\n",
             "cut.pt": (tmp_path / "good.pt").read_bytes()[:3000]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match="it is corrupt, truncated or not a torch file"):
            load_checkpoint(tmp_path / name, registry=Registry())
    (tmp_path / "objects.pt").write_bytes(pickle.dumps(Entry, protocol=2))
    with pytest.raises(DataError, match="it holds Python objects"):
        load_checkpoint(tmp_path / "objects.pt", registry=Registry())


def _stated_default(field):
    """A params field's default, sequences as tuples (a recipe's list and a signature's tuple are one default)."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return dataclasses.MISSING
    return tuple(value) if isinstance(value, list) else value


def _registered_with_params():
    entries = registry_from_plugin_manager(make_plugin_manager()).entries()
    return [pytest.param(e.spec, id=f"{e.spec.kind}:{e.spec.name}") for e in entries if e.spec.params is not None]


@pytest.mark.parametrize("spec", _registered_with_params())
def test_a_factorys_defaults_are_its_params_defaults(spec):
    """Where a strategy's factory states a default for a parameter its params dataclass also declares, the two agree:
    the recipe (validated through the dataclass) and direct construction get the same strategy, and a changed
    default cannot land in one place only. ``None`` for an empty container is the usual mutable-default guard."""
    signature = inspect.signature(spec.factory)
    for field in dataclasses.fields(spec.params):
        parameter = signature.parameters.get(field.name)
        default = _stated_default(field)
        if not field.init or parameter is None or parameter.default is inspect.Parameter.empty \
                or default is dataclasses.MISSING:
            continue
        stated = tuple(parameter.default) if isinstance(parameter.default, list) else parameter.default
        if stated is None and default in ({}, (), set()):
            continue
        assert stated == default, f"{spec.name}.{field.name}: the factory says {stated!r}, the params {default!r}"

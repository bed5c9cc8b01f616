"""The plugin manager: built-ins, third-party entry points, duplicates, broken plugins."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

import preftune
from preftune import PluginError, get_plugin_manager, get_registry, hookimpl, hookspecs


def test_the_repo_root_is_not_importable() -> None:
    """Tests see preftune as installed: a stray ``from core import ...`` would fail for users."""
    assert importlib.util.find_spec("core") is None
    assert importlib.util.find_spec("plugins") is None


def test_builtins_register_every_kind(registry: Any) -> None:
    assert registry.names("format") == ["chosen_rejected", "input_output", "trl_conversational",
                                        "trl_implicit", "trl_standard"]
    assert registry.names("source") == ["arrow", "hf", "json", "jsonl", "parquet"]
    assert registry.names("loss") == ["apo_down", "apo_zero", "bco_pair", "cdpo", "combined", "discopop",
                                      "dpo", "exo_pair", "hinge", "nca_pair", "orpo", "robust", "rpo",
                                      "sft", "simpo", "sppo_hard"]
    assert registry.names("reference") == ["lora_shared", "none", "separate"]
    assert registry.names("backend") == ["fireworks", "local", "tinker"]
    assert registry.names("sink") == ["console", "jsonl", "mlflow", "tensorboard", "wandb", "weight_sync"]
    assert {c.distribution for c in registry.all()} == {"preftune"}


def test_the_core_imports_no_plugin() -> None:
    core = Path(preftune.__file__).parent
    for path in core.rglob("*.py"):
        source = path.read_text()
        assert "from .plugins" not in source and "import preftune.plugins" not in source, path
        assert "from preftune.plugins" not in source, path


def make_dist(root: Path, dist: str, module: str, code: str) -> None:
    """A distribution visible to importlib.metadata without installing it."""
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"  # the wheel naming rule
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[preftune]\n{module} = {module}\n")
    (root / f"{module}.py").write_text(code)


THIRD_PARTY = """
from preftune import hookimpl

class Hinge:
    needs_reference = True
    def __call__(self, policy, reference, batch):
        raise NotImplementedError

@hookimpl
def register_losses(register):
    register("sq_hinge", lambda config, options: Hinge())
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("PREFTUNE_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("pt_")]:
        del sys.modules[name]


def test_third_party_plugin_is_found_through_its_entry_point(site: Path) -> None:
    make_dist(site, "preftune-hinge", "pt_hinge", THIRD_PARTY)
    registry = get_registry()
    hinge = registry.get("loss", "sq_hinge")
    assert (hinge.distribution, hinge.version, hinge.plugin) == ("preftune-hinge", "1.0", "pt_hinge")


def test_duplicate_names_are_an_error_naming_both_distributions(site: Path) -> None:
    make_dist(site, "preftune-dup", "pt_dup", THIRD_PARTY.replace('"sq_hinge"', '"dpo"'))
    with pytest.raises(PluginError) as info:
        get_registry()
    message = str(info.value)
    assert "loss 'dpo' is registered twice" in message
    assert "distribution preftune)" in message and "distribution preftune-dup" in message


def test_broken_plugins_are_recorded_and_named_only_when_needed(site: Path) -> None:
    make_dist(site, "preftune-broken", "pt_broken", "import not_a_module_anywhere\n")
    make_dist(site, "preftune-typo", "pt_typo",
              "from preftune import hookimpl\n@hookimpl\ndef register_lossez(register):\n    pass\n")
    make_dist(site, "preftune-badsig", "pt_badsig",
              "from preftune import hookimpl\n@hookimpl\ndef register_losses(register, extra):\n"
              "    pass\n")
    registry = get_registry()
    assert registry.get("loss", "dpo")  # a run that does not need them still works
    broken = {b.name: b for b in registry.pm.broken}
    assert broken["pt_broken"].distribution == "preftune-broken"
    assert "ModuleNotFoundError" in broken["pt_broken"].error
    assert "register_lossez" in broken["pt_typo"].error
    assert broken["pt_badsig"].distribution == "preftune-badsig"
    assert "extra" in broken["pt_badsig"].error
    with pytest.raises(preftune.ConfigError) as info:
        registry.get("loss", "kto")
    assert "preftune-broken failed to load" in str(info.value)


def test_autoload_can_be_disabled(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dist(site, "preftune-hinge", "pt_hinge", THIRD_PARTY)
    monkeypatch.setenv("PREFTUNE_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "sq_hinge" not in get_registry().names("loss")


def test_in_process_plugin_registers_like_an_installed_one() -> None:
    class Sink:
        pass

    class Plugin:
        @hookimpl
        def register_sinks(self, register: Any) -> None:
            register("mine", lambda config, options: Sink())

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Plugin(), name="mine-plugin")
    assert get_registry(pm).get("sink", "mine").plugin == "mine-plugin"


def test_every_hook_is_documented() -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith(("register_", "preftune_")):
            assert fn.__doc__, name
            signature = f"{name}({', '.join(inspect.signature(fn).parameters)})"
            assert signature in docs, f"{signature} missing from docs/plugins.md"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = 1


def shared_name_plugins(loss_options: Any, sink_options: Any) -> tuple[Any, Any]:
    """A loss plugin and a sink plugin that both register a component called ``shared``."""

    class LossPlugin:
        @hookimpl
        def register_losses(self, register: Any) -> None:
            register("shared", lambda config, options: ("loss", options), loss_options)

    class SinkPlugin:
        @hookimpl
        def register_sinks(self, register: Any) -> None:
            register("shared", lambda config, options: ("sink", options), sink_options)

    return LossPlugin(), SinkPlugin()


def test_one_options_table_cannot_belong_to_two_kinds() -> None:
    pm = get_plugin_manager(load_entrypoints=False)
    loss, sink = shared_name_plugins(Options, Options)
    pm.register(loss, name="loss-plugin")
    pm.register(sink, name="sink-plugin")
    with pytest.raises(PluginError) as info:
        get_registry(pm)
    message = str(info.value)
    assert "the [shared] options table is claimed twice" in message
    assert "loss 'shared' of plugin 'loss-plugin'" in message
    assert "sink 'shared' of plugin 'sink-plugin'" in message


def test_kinds_may_share_a_name_when_one_has_options() -> None:
    pm = get_plugin_manager(load_entrypoints=False)
    loss, sink = shared_name_plugins(Options, None)
    pm.register(loss, name="loss-plugin")
    pm.register(sink, name="sink-plugin")
    registry = get_registry(pm)
    assert registry.options_model("shared") is Options
    config = preftune.Config(base_model="builtin:tiny", dataset="d", shared={"size": 3})
    assert config.check_plugin_tables(registry)["shared"].size == 3
    assert registry.build("loss", "shared", config) == ("loss", Options(size=3))
    assert registry.build("sink", "shared", config) == ("sink", None)


def test_an_options_table_cannot_be_named_like_a_config_field() -> None:
    class Plugin:
        @hookimpl
        def register_losses(self, register: Any) -> None:
            register("beta", lambda config, options: None, Options)

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Plugin(), name="beta-plugin")
    with pytest.raises(PluginError, match="'beta' is a top-level config field"):
        get_registry(pm)


def test_a_table_clash_with_an_installed_plugin_names_both_distributions(site: Path) -> None:
    code = ("from preftune import hookimpl\nfrom pydantic import BaseModel\n"
            "class O(BaseModel):\n    x: int = 0\n"
            "@hookimpl\ndef register_sinks(register):\n    register('orpo', lambda c, o: None, O)\n")
    make_dist(site, "preftune-clash", "pt_clash", code)
    with pytest.raises(PluginError) as info:
        get_registry()
    message = str(info.value)
    assert "[orpo] options table is claimed twice" in message
    assert "(distribution preftune)" in message and "(distribution preftune-clash)" in message


class StrayEvents:
    """A plugin that implements an event hook itself instead of registering a sink."""

    @hookimpl
    def preftune_log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        raise AssertionError("never called")


def test_registering_a_plugin_with_event_hooks_is_an_error() -> None:
    pm = get_plugin_manager(load_entrypoints=False)
    with pytest.raises(PluginError) as info:
        pm.register(StrayEvents(), name="stray")
    message = str(info.value)
    assert "plugin 'stray' implements the event hook preftune_log_metrics" in message
    assert "methods of a sink" in message and "register_sinks" in message
    assert pm.get_plugin("stray") is None
    assert not hasattr(pm.hook, "preftune_log_metrics")  # the discovery manager has no events


def test_an_installed_plugin_with_module_level_event_hooks_is_broken(site: Path) -> None:
    make_dist(site, "preftune-stray", "pt_stray",
              "from preftune import hookimpl\n@hookimpl\ndef preftune_run_end(summary):\n    pass\n")
    registry = get_registry()
    assert registry.get("loss", "dpo")  # the other plugins still work
    [broken] = registry.pm.broken
    assert (broken.name, broken.distribution) == ("pt_stray", "preftune-stray")
    assert "PluginError: plugin 'pt_stray' implements the event hook preftune_run_end" in broken.error
    assert "returned by a factory" in broken.error and "register_sinks" in broken.error

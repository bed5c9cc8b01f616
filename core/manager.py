"""The plugin manager and the registry of named components.

Built-in plugins are modules named in :data:`DEFAULT_PLUGINS`, registered exactly as a third
party's entry point is. Third parties come from the entry-point group ``preftune``. A plugin that
fails to load is recorded as broken (with its distribution) rather than breaking every run; asking
for a component that only it could have provided names it in the error.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pluggy
from pydantic import BaseModel

from . import hookspecs
from .config import Config
from .errors import ConfigError, PluginError

DEFAULT_PLUGINS = (
    "preftune.plugins.formats",
    "preftune.plugins.sources",
    "preftune.plugins.dpo",
    "preftune.plugins.orpo",
    "preftune.plugins.dpo_variants",
    "preftune.plugins.combined",
    "preftune.plugins.references",
    "preftune.plugins.local",
    "preftune.plugins.tinker",
    "preftune.plugins.fireworks",
    "preftune.plugins.console",
    "preftune.plugins.jsonl",
    "preftune.plugins.wandb_sink",
    "preftune.plugins.tensorboard_sink",
    "preftune.plugins.mlflow_sink",
    "preftune.plugins.weight_sync",
)
ENTRY_POINT_GROUP = "preftune"
AUTOLOAD_ENV = "PREFTUNE_DISABLE_PLUGIN_AUTOLOAD"

# component kind -> the discovery hook that registers components of that kind
KINDS = {
    "format": "register_formats",
    "source": "register_sources",
    "loss": "register_losses",
    "reference": "register_reference_providers",
    "backend": "register_backends",
    "sink": "register_sinks",
}
PLURALS = {"format": "formats", "source": "sources", "loss": "losses", "reference": "reference providers",
           "backend": "backends", "sink": "sinks"}
# the event hooks, which only sinks implement (as methods of the object a sink's factory returns)
EVENT_HOOKS = tuple(name for name in vars(hookspecs) if name.startswith("preftune_"))


def hookspecs_for(names: tuple[str, ...]) -> type:
    """A namespace holding only the hookspecs ``names``, for ``add_hookspecs``."""
    return type("Hookspecs", (), {name: staticmethod(getattr(hookspecs, name)) for name in names})


@dataclass(frozen=True)
class Component:
    """A named component a plugin registered."""

    kind: str
    name: str
    factory: Callable[..., Any]
    options: type[BaseModel] | None
    plugin: str
    distribution: str
    version: str


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that could not be loaded or registered."""

    name: str
    distribution: str
    error: str


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus where each plugin came from and which plugins failed to load.

    It knows the discovery hooks only. A plugin that implements an event hook itself is refused:
    its hook would never be called, since events go to the sinks a run selected, in a manager of
    the run's own (:mod:`preftune.sinks`).
    """

    def __init__(self) -> None:
        super().__init__("preftune")
        self.add_hookspecs(hookspecs_for(tuple(KINDS.values())))
        self.origins: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
        self.broken: list[BrokenPlugin] = []

    def add_plugin(self, plugin: Any, name: str, distribution: str, version: str) -> None:
        """Register ``plugin``; a plugin that fails validation is recorded as broken."""
        try:
            self.register(plugin, name=name)
        except Exception as exc:  # a bad hook signature, a duplicate registration
            self.broken.append(BrokenPlugin(name, distribution, f"{type(exc).__name__}: {exc}"))
            return
        self.origins[name] = (distribution, version)

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        """pluggy's ``register``; a :class:`PluginError` for a plugin implementing event hooks."""
        events = implemented_hooks(self, plugin) & set(EVENT_HOOKS)
        if events:
            raise PluginError(
                f"plugin {name or self.get_canonical_name(plugin)!r} implements the event hook "
                f"{', '.join(sorted(events))} itself, so nothing would ever call it: event hooks are "
                "methods of a sink, the object returned by a factory that the plugin's register_sinks "
                "hook registers"
            )
        return super().register(plugin, name)


def implemented_hooks(pm: pluggy.PluginManager, plugin: Any) -> set[str]:
    """The names of the hooks ``plugin`` has ``@hookimpl`` implementations of."""
    names = set()
    for attr in dir(plugin):
        opts = pm.parse_hookimpl_opts(plugin, attr)
        if opts is not None:
            names.add(opts.get("specname") or attr)
    return names


def preftune_version() -> str:
    try:
        return importlib.metadata.version("preftune")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def get_plugin_manager(load_entrypoints: bool = True) -> PluginManager:
    """A fresh plugin manager with the built-ins and, unless disabled, installed plugins.

    Set ``PREFTUNE_DISABLE_PLUGIN_AUTOLOAD=1`` (or true/yes) to skip third-party entry points.
    """
    pm = PluginManager()
    version = preftune_version()
    for module_name in DEFAULT_PLUGINS:
        pm.add_plugin(importlib.import_module(module_name), module_name, "preftune", version)
    if load_entrypoints and os.environ.get(AUTOLOAD_ENV, "").lower() not in ("1", "true", "yes"):
        _load_entrypoints(pm)
    _check_pending(pm)
    return pm


def _load_entrypoints(pm: PluginManager) -> None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else "unknown"
        version = ep.dist.version if ep.dist else "unknown"
        if ep.name in pm.origins:
            other, _ = pm.origins[ep.name]
            if other == dist:
                continue  # the same distribution seen twice on sys.path
            raise PluginError(f"plugin name {ep.name!r} is used by distribution {other} and by "
                              f"distribution {dist}; uninstall one of them")
        if pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            pm.broken.append(BrokenPlugin(ep.name, dist, f"{type(exc).__name__}: {exc}"))
            continue
        pm.add_plugin(plugin, ep.name, dist, version)


def _check_pending(pm: PluginManager) -> None:
    """Unregister plugins that implement hooks that do not exist (a misspelled name)."""
    while True:
        try:
            pm.check_pending()
            return
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or repr(exc.plugin)
            dist, _ = pm.origins.pop(name, ("unknown", ""))
            pm.unregister(exc.plugin)
            pm.broken.append(BrokenPlugin(name, dist, str(exc)))


class Registry:
    """Every component the plugins of one plugin manager registered, by kind and name."""

    def __init__(self, pm: PluginManager):
        self.pm = pm
        self.components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
        for kind, hook_name in KINDS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                self._call_register_hook(kind, impl)

    def _call_register_hook(self, kind: str, impl: Any) -> None:
        dist, version = self.pm.origins.get(impl.plugin_name, ("unknown", "unknown"))

        def register(
            name: str, factory: Callable[..., Any], options: type[BaseModel] | None = None
        ) -> None:
            component = Component(kind, name, factory, options, impl.plugin_name, dist, version)
            self._add(component)

        given = {"register": register, "registry": self}  # each hook takes the ones it names
        try:
            impl.function(**{arg: given[arg] for arg in impl.argnames})
        except PluginError:
            raise
        except Exception as exc:
            error = f"{impl.function.__name__} raised {type(exc).__name__}: {exc}"
            self.pm.broken.append(BrokenPlugin(impl.plugin_name, dist, error))

    def _add(self, component: Component) -> None:
        """Add ``component``; a :class:`PluginError` when its name or option table is taken.

        Names are unique within a kind. Across kinds a name may repeat (a service's backend and
        reference provider may share one), but only one component of a name may have options:
        a config's ``[name]`` table is flat, not per kind, so that ``[orpo]`` or ``[wandb]`` stay
        as short as the names a config selects them by, and a second options model for the same
        table would make it ambiguous. An options table may not be named like a top-level field.
        """
        known = self.components[component.kind]
        if component.name in known:
            other = known[component.name]
            raise PluginError(
                f"{component.kind} {component.name!r} is registered twice: by plugin "
                f"{other.plugin!r} (distribution {other.distribution}) and by plugin "
                f"{component.plugin!r} (distribution {component.distribution}); "
                "uninstall one of them"
            )
        if component.options is not None:
            self._check_table(component)
        known[component.name] = component

    def _check_table(self, component: Component) -> None:
        name = component.name
        if name in Config.model_fields:
            raise PluginError(
                f"{component.kind} {name!r} of plugin {component.plugin!r} (distribution "
                f"{component.distribution}) has options, but [{name}] cannot be its table: "
                f"{name!r} is a top-level config field; the plugin must rename it"
            )
        other = self._table_owner(name)
        if other is not None:
            raise PluginError(
                f"the [{name}] options table is claimed twice: by {other.kind} {name!r} of plugin "
                f"{other.plugin!r} (distribution {other.distribution}) and by {component.kind} "
                f"{name!r} of plugin {component.plugin!r} (distribution {component.distribution}); "
                "components of different kinds may share a name only if at most one has options: "
                "uninstall one of them"
            )

    def _table_owner(self, name: str) -> Component | None:
        """The component called ``name`` that has options (at most one exists), or None."""
        for by_name in self.components.values():
            if name in by_name and by_name[name].options is not None:
                return by_name[name]
        return None

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def get(self, kind: str, name: str) -> Component:
        """The component, or a :class:`ConfigError` that lists the known names."""
        try:
            return self.components[kind][name]
        except KeyError:
            raise ConfigError(self._unknown(kind, name)) from None

    def _unknown(self, kind: str, name: str) -> str:
        known = self.names(kind)
        message = f"unknown {kind} {name!r}; known {PLURALS[kind]}: {', '.join(known) or '(none)'}"
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            message += f" (did you mean {close[0]!r}?)"
        for broken in self.pm.broken:
            message += (
                f"\nnote: plugin {broken.name!r} from distribution {broken.distribution} "
                f"failed to load and may have provided it: {broken.error}"
            )
        return message

    def operational_keys(self) -> set[str]:
        """``table.key`` of every option marked ``json_schema_extra={"operational": True}``: how a
        component runs (timeouts, retries), not what it computes; a resumed run may change it."""
        return {f"{c.name}.{info.alias or name}" for c in self.all() if c.options is not None
                for name, info in c.options.model_fields.items()
                if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("operational")}

    def all(self) -> list[Component]:
        return [c for kind in KINDS for c in sorted(self.components[kind].values(), key=_name)]

    def options_model(self, name: str) -> type[BaseModel] | None:
        """The options model of the ``[name]`` config table (unambiguous: see :meth:`_add`)."""
        owner = self._table_owner(name)
        return owner.options if owner is not None else None

    def check(self, kind: str, name: str, config: Any) -> Component:
        """The component, once its factory's optional ``check(config, options)`` accepted the
        settings: a cheap look, before anything loads, at values the component cannot use."""
        component = self.get(kind, name)
        check = getattr(component.factory, "check", None)
        if callable(check):
            check(config, config.options_for(name, component.options) if component.options else None)
        return component

    def build(self, kind: str, name: str, config: Any, *args: Any, **kwargs: Any) -> Any:
        """Build the component ``name`` of ``kind`` with its validated options."""
        component = self.get(kind, name)
        options = config.options_for(name, component.options) if component.options else None
        return component.factory(config, options, *args, **kwargs)


def _name(component: Component) -> str:
    return component.name


def get_registry(pm: PluginManager | None = None) -> Registry:
    """The registry of ``pm`` (a fresh default plugin manager when None)."""
    return Registry(pm if pm is not None else get_plugin_manager())

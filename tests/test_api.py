"""The public API is what users and plugin authors need; backend helpers live in a submodule."""

from __future__ import annotations

import importlib

import preftune


def test_the_top_level_exports_only_user_and_plugin_author_names() -> None:
    assert set(preftune.__all__) == {
        "AdamParams", "Backend", "Config", "ConfigError", "DataError", "DataSource", "DatasetFormat",
        "DiskError",
        "ForwardClient", "Loss", "LossFn", "Message", "Metrics", "PairLogps", "PluginError",
        "PreferencePair", "PreftuneError", "PublishingBackend", "RecordError", "ReferenceProvider",
        "SamplingBackend", "SinkError", "Source", "TokenLogps", "TokenizedPair", "TrainingError",
        "get_plugin_manager", "get_registry", "hookimpl", "load_config", "log", "looks_like_secret",
        "mask_secrets", "run", "secret_hint", "tokenize_pair"}
    assert all(hasattr(preftune, name) for name in preftune.__all__)
    for helper in ("atomic_dir", "switch_symlink", "load_causal_lm", "files_hash", "collate", "Batch"):
        assert not hasattr(preftune, helper), helper


def test_backend_helpers_are_one_documented_import_away() -> None:
    utils = importlib.import_module("preftune.backend_utils")
    assert utils.__doc__ and set(utils.__all__) >= {"atomic_dir", "load_causal_lm", "files_hash"}
    assert all(callable(getattr(utils, name)) for name in utils.__all__)
    layout = importlib.import_module("preftune.layout")
    assert callable(layout.shared_layout) and callable(layout.padded_layout)


def test_hub_and_weights_each_do_one_job() -> None:
    hub, weights = (importlib.import_module(f"preftune.{m}") for m in ("hub", "weights"))
    assert {"load_tokenizer", "tokenizer_identity", "model_identity"} <= set(vars(hub))
    assert not hasattr(hub, "load_causal_lm") and not hasattr(weights, "load_tokenizer")
    assert {"load_causal_lm", "files_hash", "state_dict_hash", "resolve_init"} <= set(vars(weights))

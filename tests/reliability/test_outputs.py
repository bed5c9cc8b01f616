"""A run never writes over its inputs (issue 23): every output it writes is checked against every
input, by real path, before anything is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from preftune import ConfigError, load_config, run
from preftune.outputs import LOG_DIRS, LOG_FILES

OUTPUT_FILES = sorted(LOG_FILES)  # config.json, metrics.jsonl, eval.jsonl, summary.json, ...


@pytest.fixture
def data_at(small_dataset: Any) -> Any:
    """A small dataset at ``path``, its folders made."""
    def make(path: Path, n: int = 24) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return small_dataset(path, n=n)

    return make


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_output_a_run_writes_is_listed() -> None:
    """The list the check uses names what the run, the jsonl sink, report and skips write."""
    assert {"config.json", "metrics.jsonl", "eval.jsonl", "summary.json", "skipped.jsonl",
            "report.html", "loss.png", "eval_accuracy.png"} <= set(LOG_FILES)
    assert {"final", "checkpoints", "deployments"} <= set(LOG_DIRS)


@pytest.mark.parametrize("name", OUTPUT_FILES)
def test_an_input_named_like_an_output_file_in_log_path_is_refused_and_kept(
        make_config: Any, small_dataset: Any, tmp_path: Path, name: str) -> None:
    exp = tmp_path / "exp"
    exp.mkdir()
    held_out = small_dataset(exp / name, n=6)  # the user's held-out pairs, named like an output
    before = snapshot(exp)
    with pytest.raises(ConfigError, match=(
            rf"^log_path: the run writes {exp / name} \(.+\), which is eval_dataset {held_out}; "
            r"set log_path elsewhere or move eval_dataset \(nothing was written\)$")):
        run(make_config(eval_dataset=str(held_out), log_path=str(exp)))
    assert snapshot(exp) == before


@pytest.mark.parametrize("directory", sorted(LOG_DIRS))
def test_an_input_inside_an_output_directory_is_refused(
        make_config: Any, data_at: Any, tmp_path: Path, directory: str) -> None:
    data = data_at(tmp_path / "exp" / directory / "train.jsonl")
    with pytest.raises(ConfigError, match=rf"the run writes .*{directory} \(.+\), which holds dataset"):
        run(make_config(dataset=str(data), log_path=str(tmp_path / "exp")))
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == [directory]


def test_paths_are_compared_after_symlinks_and_dotdot(make_config: Any, data_at: Any,
                                                       tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    held_out = data_at(exp / "eval.jsonl", n=6)
    (tmp_path / "link").symlink_to(exp)
    for log_path in (tmp_path / "link", tmp_path / "other" / ".." / "exp"):
        with pytest.raises(ConfigError, match="which is eval_dataset"):
            run(make_config(eval_dataset=str(held_out), log_path=str(log_path)))
    assert sorted(p.name for p in exp.iterdir()) == ["eval.jsonl"]


def test_the_config_file_a_model_directory_and_cache_dir_are_inputs_too(
        make_config: Any, small_dataset: Any, data_at: Any, tmp_path: Path) -> None:
    from preftune.tiny import tiny_model

    data = small_dataset(tmp_path / "d.jsonl")
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "config.json").write_text(  # a JSON config, kept in the experiment's folder
        json.dumps({"base_model": "builtin:tiny", "dataset": str(data), "log_path": str(exp)}))
    with pytest.raises(ConfigError, match="which is the config file"):
        run(load_config(exp / "config.json"))
    model = tmp_path / "model"
    tiny_model().save_pretrained(model)
    with pytest.raises(ConfigError, match=rf"the run writes {model}/run/config.json .*which is inside "
                                          rf"base_model {model}"):
        run(make_config(base_model=str(model), log_path=str(model / "run")))
    with pytest.raises(ConfigError, match="which holds cache_dir"):
        run(make_config(log_path=str(tmp_path / "r"), cache_dir=str(tmp_path / "r" / "final" / "c")))
    with pytest.raises(ConfigError, match="the run writes .*reference .*which holds dataset"):
        run(make_config(dataset=str(data_at(tmp_path / "c2" / "reference" / "d.jsonl")),
                        log_path=str(tmp_path / "r2"), cache_dir=str(tmp_path / "c2")))
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()


def test_a_plugin_writing_outside_log_path_is_checked_too(make_config: Any, data_at: Any,
                                                           tmp_path: Path) -> None:
    data = data_at(tmp_path / "shared" / "d.jsonl")
    with pytest.raises(ConfigError, match=r"^weight_sync.directory: the run writes .*shared .*which "
                                          r"holds dataset"):
        run(make_config(dataset=str(data), log_path=str(tmp_path / "r"),
                        sinks=["jsonl", "weight_sync"],
                        weight_sync={"directory": str(tmp_path / "shared")}))


def test_a_dangling_symlink_as_log_path_is_named(make_config: Any, tmp_path: Path) -> None:
    link = tmp_path / "logs"
    link.symlink_to(tmp_path / "gone" / "away")
    with pytest.raises(Exception, match=rf"{link} is a symbolic link to {tmp_path / 'gone' / 'away'}, "
                                        "which does not exist"):
        run(make_config(log_path=str(link)))

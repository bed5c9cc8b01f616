"""Issue 21's proof for sources: the same pairs read from JSONL, JSONL.gz, Parquet, a Parquet
directory, a ``save_to_disk`` directory, a hub id (a hub cache written here, read offline) and
TRL's conversational form give identical step-0 log-probs: the same reference cache, and the
same first training step (loss, log-probs, gradient norm) on the tiny model."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from preftune import Config, run
from preftune.testing.hubdata import hub_cache, write_parquet

STEP_KEYS = ("loss", "logps_chosen", "logps_rejected", "grad_norm", "tokens")


def records(changed: int | None = None) -> list[dict[str, Any]]:
    """12 pairs in the cookbook's chosen/rejected form, some with a system turn, one multi-line;
    ``changed``: that pair's rejected answer says something else."""
    out = []
    for i in range(12):
        prompt = [{"role": "user", "content": f"Question {i}: is the {['sea', 'sky', 'tea'][i % 3]} blue?"}]
        if i % 4 == 0:
            prompt.insert(0, {"role": "system", "content": "Answer briefly."})
        chosen = f"Yes, {i} is right.\nIt is blue." if i == 5 else f"Yes, {i} is right."
        rejected = f"No, {i} is wrong." if i != changed else f"Maybe {i}, who knows."
        out.append({"chosen": {"messages": [*prompt, {"role": "assistant", "content": chosen}]},
                    "rejected": {"messages": [*prompt, {"role": "assistant", "content": rejected}]}})
    return out


def conversational(record: dict[str, Any]) -> dict[str, Any]:
    """A chosen/rejected record as TRL's conversational one: the prompt and each response apart."""
    chosen, rejected = record["chosen"]["messages"], record["rejected"]["messages"]
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}




def write_form(form: str, root: Path, monkeypatch: pytest.MonkeyPatch, rows: list[Any]) -> str:
    """``rows`` written as ``form``; the ``dataset`` setting that reads them."""
    root.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    if form == "jsonl":
        (root / "d.jsonl").write_text(lines)
        return str(root / "d.jsonl")
    if form == "jsonl.gz":
        (root / "d.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
        return str(root / "d.jsonl.gz")
    if form == "parquet":
        return str(write_parquet(root / "d.parquet", rows))
    if form == "parquet-dir":  # two shards, named as the hub names them, read in order
        for i in range(2):
            write_parquet(root / "pq" / f"train-{i:05d}-of-00002.parquet", rows[i * 6:(i + 1) * 6])
        return str(root / "pq")
    if form == "save_to_disk":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(root / "saved"))
        return str(root / "saved")
    if form == "hub":
        return "hf:" + hub_cache(root / "hf", monkeypatch, rows)
    if form == "trl_conversational":
        (root / "conv.jsonl").write_text("".join(json.dumps(conversational(r)) + "\n" for r in rows))
        return str(root / "conv.jsonl")
    raise AssertionError(form)


def one_step(root: Path, dataset: str) -> dict[str, Any]:
    """One step over all 12 pairs on the tiny model, fixed seed, nothing held out: the first
    metrics row and the reference cache's per-pair log-probs."""
    config = Config(base_model="builtin:tiny", dataset=dataset, log_path=str(root / "logs"),
                    cache_dir=str(root / "cache"), batch_size=12, epochs=1, eval_fraction=0,
                    max_seq_len=64, seed=7, learning_rate=1e-3, sinks=["jsonl"], local={"threads": 1})
    summary = run(config)
    assert summary["status"] == "completed" and summary["steps"] == 1
    row = json.loads((root / "logs" / "metrics.jsonl").read_text().splitlines()[0])
    [cache] = (root / "cache" / "reference").glob("*.pt")
    reference = torch.load(cache, weights_only=False)
    return {"step": {k: row[k] for k in STEP_KEYS},
            "reference": {k: v for k, v in reference.items() if isinstance(v, torch.Tensor)}}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The JSONL run every other form is compared with."""
    root = tmp_path_factory.mktemp("baseline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("PREFTUNE_DISABLE_PLUGIN_AUTOLOAD", "1")
        mp.setenv("OMP_NUM_THREADS", "1")
        return one_step(root, write_form("jsonl", root, mp, records()))


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["step"] == want["step"]  # bit for bit: the same tokens in the same order
    assert got["reference"].keys() == want["reference"].keys()
    for key, tensor in want["reference"].items():
        assert torch.equal(got["reference"][key], tensor), key


def test_the_baseline_trains_on_every_pair_to_its_end_of_turn(baseline: dict[str, Any]) -> None:
    reference = baseline["reference"]
    assert reference["chosen_sum"].shape == (12,)
    assert torch.isfinite(reference["chosen_sum"]).all() and (reference["chosen_sum"] < 0).all()
    assert baseline["step"]["loss"] == pytest.approx(0.6931, abs=1e-4)  # the policy is the reference
    assert baseline["step"]["grad_norm"] > 0


@pytest.mark.parametrize("form", ["jsonl.gz", "parquet", "parquet-dir", "save_to_disk", "hub",
                                  "trl_conversational"])
def test_every_source_and_form_gives_the_same_first_step(form: str, baseline: dict[str, Any],
                                                         tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = write_form(form, tmp_path / "data", monkeypatch, records())
    assert_same(one_step(tmp_path, dataset), baseline)


def test_one_changed_answer_changes_the_first_step(baseline: dict[str, Any], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above can fail: one rejected answer of twelve, reworded, is seen."""
    got = one_step(tmp_path, write_form("parquet", tmp_path / "data", monkeypatch, records(changed=3)))
    assert got["step"]["logps_rejected"] != baseline["step"]["logps_rejected"]
    assert not torch.equal(got["reference"]["rejected_sum"], baseline["reference"]["rejected_sum"])
    assert torch.equal(got["reference"]["chosen_sum"], baseline["reference"]["chosen_sum"])


def test_run_takes_a_datasets_dataset_from_python(tmp_path: Path) -> None:
    """``run(config, dataset=ds)``: the pairs of a ``datasets.Dataset`` give what the same pairs
    give from JSONL; a DatasetDict asks for a split; a bad row is named ``dataset#row``."""
    import datasets

    from preftune import ConfigError, DataError, run

    records = [{"chosen": [{"role": "user", "content": f"Say yes {i}."},
                           {"role": "assistant", "content": f"Yes {i}."}],
                "rejected": [{"role": "user", "content": f"Say yes {i}."},
                             {"role": "assistant", "content": f"No {i}."}]} for i in range(8)]
    path = tmp_path / "same.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = {"base_model": "builtin:tiny", "eval_fraction": 0, "max_seq_len": 64, "batch_size": 8,
              "sinks": ["jsonl"], "cache_dir": str(tmp_path / "cache")}
    from preftune import Config

    from_file = run(Config(dataset=str(path), log_path=str(tmp_path / "file"), **common))
    ds = datasets.Dataset.from_list(records)
    from_python = run(Config(log_path=str(tmp_path / "py"), **common), dataset=ds)
    assert from_python["status"] == "completed"
    first = [json.loads(x) for x in (tmp_path / "file" / "metrics.jsonl").read_text().splitlines()][0]
    second = [json.loads(x) for x in (tmp_path / "py" / "metrics.jsonl").read_text().splitlines()][0]
    assert first["loss"] == second["loss"] and from_file["tokens"] == from_python["tokens"]

    with pytest.raises(ConfigError, match=r"dataset: a DatasetDict of splits \(train\); pass one split"):
        run(Config(log_path=str(tmp_path / "dict"), **common), dataset=datasets.DatasetDict(train=ds))
    with pytest.raises(ConfigError, match="dataset: required"):
        run(Config(log_path=str(tmp_path / "none"), **common))
    same = [dict(r, rejected=r["chosen"]) if i == 3 else r for i, r in enumerate(records)]
    broken = datasets.Dataset.from_list(same)
    with pytest.raises(DataError, match=r"dataset#3: field 'rejected.*identical"):
        run(Config(log_path=str(tmp_path / "bad"), **common), dataset=broken)

"""The HH-RLHF example plugin, installed: found by entry point, parsed, validated, and trainable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from preftune_hh_format import HHFormat
from typer.testing import CliRunner

from preftune import Config, DataError, Message, RecordError, get_registry, run
from preftune.cli import app
from preftune.data import make_format

# the shape of Anthropic/hh-rlhf's records: a leading blank line before every turn
TWO_TURNS = {
    "chosen": "\n\nHuman: What is a good name for a cat?\n\nAssistant: Miso.\n\nHuman: Another?"
              "\n\nAssistant: Pepper, or Juniper.",
    "rejected": "\n\nHuman: What is a good name for a cat?\n\nAssistant: Miso.\n\nHuman: Another?"
                "\n\nAssistant: Cats do not need names.",
}


def write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_hh_rlhf_is_registered_from_its_distribution() -> None:
    component = get_registry().get("format", "hh_rlhf")
    assert (component.distribution, component.plugin) == ("preftune-hh-format", "hh_rlhf")


def test_a_multi_turn_transcript_is_the_chat_pair_of_its_conversation() -> None:
    pair = HHFormat().parse(TWO_TURNS)
    assert pair.prompt == (Message("user", "What is a good name for a cat?"), Message("assistant", "Miso."),
                           Message("user", "Another?"))
    assert pair.chosen == (Message("assistant", "Pepper, or Juniper."),)
    assert pair.rejected == (Message("assistant", "Cats do not need names."),)
    turns = [m.as_dict() for m in pair.prompt]
    registry = get_registry()
    whole = registry.build("format", "chosen_rejected", Config(base_model="builtin:tiny", dataset="x"))
    answers = [{"role": "assistant", "content": c}
               for c in ("Pepper, or Juniper.", "Cats do not need names.")]
    assert whole.parse({"chosen": turns + answers[:1], "rejected": turns + answers[1:]}) == pair


@pytest.mark.parametrize(
    ("record", "field", "says"),
    [
        ({**TWO_TURNS, "chosen": "Note:" + TWO_TURNS["chosen"]}, "chosen", "text outside"),
        ({**TWO_TURNS, "rejected": "Human: Hi\n\nAssistant: Go."}, "rejected", "text outside"),
        ({**TWO_TURNS, "rejected": TWO_TURNS["rejected"] + "\n\nHuman: And?"}, "rejected", "must end"),
        ({**TWO_TURNS, "rejected": TWO_TURNS["rejected"].replace("Another?", "More?")}, "rejected", "turn 2"),
        ({"chosen": TWO_TURNS["chosen"]}, "rejected", "missing"),
    ],
)
def test_bad_transcripts_name_the_field(record: dict, field: str, says: str) -> None:
    with pytest.raises(RecordError) as info:
        HHFormat().parse(record)
    assert info.value.field == field and says in info.value.message


def test_matches_only_transcripts_and_auto_then_asks_for_the_format() -> None:
    assert HHFormat().matches(TWO_TURNS)
    assert not HHFormat().matches({"chosen": "The sky is blue.", "rejected": "The sky is green."})
    assert not HHFormat().matches({**TWO_TURNS, "prompt": "What is a good name for a cat?"})
    assert not HHFormat().matches({"chosen": [{"role": "user", "content": "\n\nHuman: x\n\nAssistant: y"}],
                                   "rejected": TWO_TURNS["rejected"]})
    # TRL's implicit-prompt format takes the same two strings: auto cannot choose, by design
    auto = make_format(get_registry(), Config(base_model="builtin:tiny", dataset="x", format="auto"))
    with pytest.raises(RecordError, match=r"matches several formats \(.*hh_rlhf.*\); set format"):
        auto.parse(TWO_TURNS)


def test_validate_names_the_bad_line_and_a_run_trains(tmp_path: Path) -> None:
    words = ["red", "blue", "green", "gold", "pink", "gray"]
    records = [{"chosen": f"\n\nHuman: Say yes to {w} {i}.\n\nAssistant: Yes, {w}.",
                "rejected": f"\n\nHuman: Say yes to {w} {i}.\n\nAssistant: Never {w}."}
               for i, w in enumerate(words * 4)]
    bad = write(tmp_path / "bad.jsonl", [records[0], {"chosen": "Hi", "rejected": "\n\nHuman: Hi"}])
    result = CliRunner().invoke(app, ["validate", str(bad), "--format", "hh_rlhf"])
    assert result.exit_code == 1 and "bad.jsonl:2" in result.output and "text outside" in result.output
    data = write(tmp_path / "hh.jsonl", records)
    config = Config(base_model="builtin:tiny", dataset=str(data), format="hh_rlhf", eval_fraction=0.25,
                    epochs=4, batch_size=4, learning_rate=3e-3, max_seq_len=64,
                    log_path=str(tmp_path / "logs"), cache_dir=str(tmp_path / "cache"), sinks=["jsonl"])
    summary = run(config)
    assert summary["final_eval"]["eval_margin"] > summary["initial_eval"]["eval_margin"]
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        run(config.model_copy(update={"dataset": str(bad)}))

"""The bytes of a dataset file are read faithfully or refused by line, never misread (issue 15)."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from preftune import Config, DataError, run
from preftune.cli import app
from preftune.data import load_pairs, make_format


@pytest.fixture
def fmt(registry: Any) -> Any:
    return make_format(registry, Config(base_model="builtin:tiny", dataset="x"))


@pytest.fixture
def lines(pair_record: Any) -> list[bytes]:
    """Three good records as JSONL lines (bytes, with their newline)."""
    return [json.dumps(pair_record(f"Question {i}?", f"Yes {i}.", f"No {i}.")).encode() + b"\n"
            for i in range(3)]


def problems(path: Path, fmt: Any) -> list[tuple[str, int, str, str]]:
    with pytest.raises(DataError) as info:
        load_pairs(path, fmt)
    return [p.as_tuple() for p in info.value.problems]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_invalid_utf8_is_an_error_naming_the_line_and_byte(tmp_path: Path, fmt: Any,
                                                           lines: list[bytes]) -> None:
    bad = lines[1].replace(b"Yes 1", b"Yes \xff1")
    path = write(tmp_path / "d.jsonl", lines[0] + bad + lines[2])
    at = bad.index(b"\xff") + 1
    assert problems(path, fmt) == [
        (str(path), 2, "", f"not valid UTF-8: byte 0xff at byte {at} of the line (save the file as UTF-8)")]


def test_a_utf8_byte_order_mark_is_skipped(tmp_path: Path, fmt: Any, lines: list[bytes]) -> None:
    plain = load_pairs(write(tmp_path / "plain.jsonl", b"".join(lines)), fmt)
    marked = load_pairs(write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + b"".join(lines)), fmt)
    assert [(p.prompt, p.chosen, p.rejected, p.source.line) for p in marked] == [
        (p.prompt, p.chosen, p.rejected, p.source.line) for p in plain]


@pytest.mark.parametrize("encoding, what", [
    ("utf-16", "UTF-16 text (it starts with a byte order mark)"),  # LE with a BOM here
    ("utf-16-be", "UTF-16 or UTF-32 text (every other byte is 0)"),
    ("utf-16-le", "UTF-16 or UTF-32 text (every other byte is 0)"),
    ("utf-32", "UTF-32 text (it starts with a byte order mark)"),
])
def test_utf16_and_utf32_are_refused_with_a_re_encode_hint(tmp_path: Path, fmt: Any, lines: list[bytes],
                                                          encoding: str, what: str) -> None:
    text = b"".join(lines).decode()
    path = write(tmp_path / "d.jsonl", text.encode(encoding))
    [(file, line, field, message)] = problems(path, fmt)
    assert (file, line, field) == (str(path), 1, "")
    assert message.startswith(f"the file is {what}, not JSONL text; preftune reads UTF-8 JSONL")
    assert "re-encode" in message


@pytest.mark.parametrize("name", ["d.jsonl.gz", "d.jsonl"])  # known by its bytes, not its name
def test_gzip_files_are_read_as_the_jsonl_they_hold(tmp_path: Path, fmt: Any, lines: list[bytes],
                                                    name: str) -> None:
    plain = load_pairs(write(tmp_path / "plain.jsonl", b"".join(lines)), fmt)
    packed = load_pairs(write(tmp_path / name, gzip.compress(b"\n".join(lines))), fmt)
    assert [(p.prompt, p.chosen, p.rejected) for p in packed] == [(p.prompt, p.chosen, p.rejected)
                                                                  for p in plain]
    assert [p.source.line for p in packed] == [1, 3, 5]  # decompressed lines, blanks counted


def test_a_truncated_gzip_file_is_an_error_after_its_last_whole_line(tmp_path: Path, fmt: Any,
                                                                       lines: list[bytes]) -> None:
    packed = gzip.compress(b"".join(lines * 400))
    path = write(tmp_path / "d.jsonl.gz", packed[: len(packed) // 2])
    [*_, (file, line, _, message)] = problems(path, fmt)
    assert file == str(path) and line > 1
    assert message.startswith(f"cannot read past line {line - 1}: the gzip stream is truncated or corrupt")


def _zip(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("d.jsonl", data)
    return buffer.getvalue()


@pytest.mark.parametrize("pack, what", [(bz2.compress, "bzip2-compressed"), (lzma.compress, "xz-compressed"),
                                        (_zip, "a zip archive")])
def test_other_archives_are_refused_naming_what_they_are(tmp_path: Path, fmt: Any, lines: list[bytes],
                                                         pack: Any, what: str) -> None:
    path = write(tmp_path / "d.jsonl", pack(b"".join(lines)))
    [(_, line, _, message)] = problems(path, fmt)
    assert line == 1 and message.startswith(f"the file is {what}, not JSONL text")


def test_crlf_blank_lines_and_u2028_inside_strings_parse_exactly(tmp_path: Path, fmt: Any,
                                                                 pair_record: Any) -> None:
    record = pair_record("Line one\u2028line two\u2029end", "Yes\u0085.", "No.")
    text = json.dumps(record, ensure_ascii=False)
    path = write(tmp_path / "d.jsonl", b"\r\n".join([b"", b" \t ", text.encode(), b"", text.encode()]))
    pairs = load_pairs(path, fmt)
    assert [p.source.line for p in pairs] == [3, 5]
    assert pairs[0].prompt[0].content == "Line one\u2028line two\u2029end"  # not split into lines
    assert pairs[0].chosen[0].content == "Yes\u0085."


def test_form_feeds_and_lone_carriage_returns_are_errors_by_line(tmp_path: Path, fmt: Any,
                                                                   lines: list[bytes]) -> None:
    feed = lines[1].replace(b'{"chosen"', b'{\x0c"chosen"')
    old_mac = lines[0].rstrip(b"\n") + b"\r" + lines[2]
    path = write(tmp_path / "d.jsonl", lines[0] + feed + old_mac)
    found = problems(path, fmt)
    assert [(line, message.split(":")[0]) for _, line, _, message in found] == [
        (2, "malformed JSON"), (3, "malformed JSON")]
    assert "lone carriage return" in found[1][3]


def test_a_lone_surrogate_escape_is_refused_naming_the_field(tmp_path: Path, fmt: Any,
                                                             pair_record: Any) -> None:
    good = json.dumps(pair_record("Smile \ud83d\ude00?", "Yes.", "No."))  # a pair: one character
    lone = json.dumps(pair_record("Q?", "Yes \ud800.", "No."))
    key = json.dumps({**pair_record("Q?", "Yes.", "No."), "\udfff": 1})
    path = write(tmp_path / "d.jsonl", "\n".join([good, lone, key]).encode())
    found = problems(path, fmt)
    assert [(line, field) for _, line, field, _ in found] == [(2, "chosen.messages[1].content"),
                                                              (3, "\\udfff")]
    assert all("lone surrogate escape" in message for *_, message in found)
    assert load_pairs(write(tmp_path / "ok.jsonl", good.encode()), fmt)[0].prompt[0].content == "Smile 😀?"


def test_deep_nesting_is_an_error_by_line_not_a_recursion_error(tmp_path: Path, fmt: Any, pair_record: Any,
                                                                 lines: list[bytes]) -> None:
    nested = "[" * 400 + '"\\ud83d\\ude00"' + "]" * 400  # deep, with a surrogate pair to look into
    deep_but_fine = json.dumps(pair_record("Q?", "Yes.", "No."))[:-1] + f', "meta": {nested}}}'
    too_deep = b"[" * 100_000 + b"]" * 100_000
    path = write(tmp_path / "d.jsonl", deep_but_fine.encode() + b"\n" + too_deep + b"\n" + lines[2])
    [(_, line, _, message)] = problems(path, fmt)
    assert line == 2 and message.startswith("JSON nested too deeply to parse")


def test_nan_and_infinity_are_not_json(tmp_path: Path, fmt: Any, pair_record: Any) -> None:
    base = json.dumps(pair_record("Q?", "Yes.", "No."))[:-1]
    path = write(tmp_path / "d.jsonl", "\n".join(
        f'{base}, "score": {c}}}' for c in ("1.5", "NaN", "-Infinity")).encode())
    assert [(line, message) for _, line, _, message in problems(path, fmt)] == [
        (2, "NaN is not JSON (JSON numbers are finite)"),
        (3, "-Infinity is not JSON (JSON numbers are finite)")]


def test_a_very_long_line_parses_in_linear_time(tmp_path: Path, fmt: Any, pair_record: Any) -> None:
    answer = "word " * 2_000_000  # a 10 MB line
    path = write(tmp_path / "d.jsonl", json.dumps(pair_record("Q?", answer, "No.")).encode() + b"\n")
    start = time.perf_counter()
    [pair] = load_pairs(path, fmt)
    assert pair.chosen[0].content == answer
    assert time.perf_counter() - start < 10  # linear: well under a second on a laptop


def test_validate_reports_bad_bytes_by_line_and_reads_gzip(tmp_path: Path, lines: list[bytes]) -> None:
    runner = CliRunner()
    bad = write(tmp_path / "bad.jsonl", lines[0] + b"\xc3\x28\n" + lines[2])
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{bad}:2: not valid UTF-8: byte 0xc3 at byte 1 of the line" in result.output
    assert f"{bad}: 3 records, 2 ok, 1 bad" in result.output
    packed = write(tmp_path / "good.jsonl.gz", gzip.compress(b"".join(lines)))
    result = runner.invoke(app, ["validate", str(packed), "--tokenizer", "builtin:tiny"])
    assert result.exit_code == 0 and f"{packed}: 3 records, 3 ok, 0 bad" in result.output


def test_a_run_trains_on_a_gzip_dataset_as_on_the_plain_file(make_config: Any, tmp_path: Path) -> None:
    plain = make_config(max_pairs=8, epochs=1)
    packed = write(tmp_path / "data.jsonl.gz", gzip.compress(Path(plain.dataset).read_bytes()))
    summary = run(make_config(dataset=str(packed), max_pairs=8, epochs=1, log_path=str(tmp_path / "gz")))
    reference = run(plain)
    assert summary["status"] == "completed"
    assert summary["final_eval"] == reference["final_eval"]  # same pairs, same split, same training

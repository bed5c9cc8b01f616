"""The identity of a local model directory: cheap (no weight bytes read), yet changed by any
rewrite of a weight file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from preftune.backend_utils import files_hash, files_identity, model_identity
from preftune.tiny import tiny_model

DAY = 24 * 3600


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """The tiny model saved as a Hugging Face directory, its files dated yesterday (a model
    downloaded earlier, not one written a moment ago)."""
    directory = tmp_path / "model"
    tiny_model(seed=1).save_pretrained(directory)
    age_files(directory)
    return directory


def age_files(directory: Path) -> None:
    past = time.time() - DAY
    for file in directory.iterdir():
        os.utime(file, (past, past))


def test_an_unchanged_directory_has_the_same_identity(model_dir: Path) -> None:
    first = model_identity(str(model_dir))
    assert first == model_identity(str(model_dir))
    assert first == {"model": str(model_dir.resolve()), "files_sha256": files_identity(model_dir)}


def test_rewriting_a_weight_file_with_other_values_of_the_same_size_changes_it(model_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    size, before = weights.stat().st_size, files_identity(model_dir)
    tiny_model(seed=2).save_pretrained(model_dir)  # same shapes and header, other values
    assert weights.stat().st_size == size
    assert files_identity(model_dir) != before


def test_a_changed_header_or_config_changes_it_even_with_old_times(model_dir: Path) -> None:
    before = files_identity(model_dir)
    config = model_dir / "config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "rms_norm_eps": 1e-5}))
    age_files(model_dir)
    assert files_identity(model_dir) != before


def test_the_weights_bytes_are_not_read(model_dir: Path) -> None:
    """Bytes past the header changed in place, size and time kept: only files_hash sees it."""
    weights = model_dir / "model.safetensors"
    identity, content = files_identity(model_dir), files_hash(model_dir)
    stat = weights.stat()
    with open(weights, "r+b") as handle:
        handle.seek(stat.st_size - 16)
        handle.write(b"\x7f" * 16)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert files_identity(model_dir) == identity
    assert files_hash(model_dir) != content  # the integrity hash (publish manifests) reads them

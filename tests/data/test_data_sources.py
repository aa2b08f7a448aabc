"""ctrlora.data.sources: local files of each type, path resolution, and the errors' messages."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrlora.data.sources import is_local_source, load_rows
from ctrlora.errors import DataError

ROWS = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]


def test_jsonl_rows_keep_their_line_numbers(write_jsonl):
    path = write_jsonl("d.jsonl", [json.dumps(ROWS[0]), "", json.dumps(ROWS[1])])
    table = load_rows(str(path), key="data.train")
    assert table.rows == ROWS
    assert table.location(1) == f"{path} line 3"


def test_json_array_jsonl_content_and_parquet_load_the_same_rows(tmp_path: Path, write_jsonl):
    array = tmp_path / "array.json"
    array.write_text(json.dumps(ROWS, indent=2))
    lines = write_jsonl("lines.json", ROWS)  # JSON-lines content under a .json name
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    for path in (array, lines, parquet):
        assert load_rows(str(path), key="data.train").rows == ROWS
    assert load_rows(str(parquet), key="data.train").location(0) == f"{parquet} row 1"


def test_relative_paths_resolve_against_base_dir_then_the_repository(tmp_path: Path, write_jsonl):
    write_jsonl("mine.jsonl", ROWS)
    assert load_rows("mine.jsonl", key="data.train", base_dir=tmp_path).rows == ROWS
    bundled = load_rows("data/examples/alpaca_sample.jsonl", key="data.train", base_dir=tmp_path)
    assert len(bundled.rows) == 20 and bundled.origin == "data/examples/alpaca_sample.jsonl"


def test_local_or_hub():
    assert is_local_source("missing/file.jsonl") and is_local_source("./folder") and is_local_source("/abs")
    assert is_local_source("data/fortune_topics")  # an existing folder
    assert not is_local_source("tatsu-lab/alpaca")


def test_missing_file_names_the_key_and_the_path(tmp_path: Path):
    with pytest.raises(DataError, match=r"data\.test: file 'nope/rows\.jsonl' not found.*nope/rows\.jsonl"):
        load_rows("nope/rows.jsonl", key="data.test", base_dir=tmp_path)


def test_malformed_json_line_names_file_and_line(write_jsonl):
    path = write_jsonl("bad.jsonl", [json.dumps(ROWS[0]), json.dumps(ROWS[1]), '{"text": "c", "label": }'])
    with pytest.raises(DataError, match=rf"{path} line 3: malformed JSON"):
        load_rows(str(path), key="data.train")
    path = write_jsonl("list.jsonl", [json.dumps(ROWS[0]), "[1, 2]"])
    with pytest.raises(DataError, match=rf"{path} line 2: expected a JSON object, got list"):
        load_rows(str(path), key="data.train")


def test_malformed_json_array_names_the_line(tmp_path: Path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]\n')
    with pytest.raises(DataError, match=rf"{path} line 3: malformed JSON"):
        load_rows(str(path), key="data.train")


def test_hub_id_offline_says_there_is_no_local_copy():
    with pytest.raises(DataError) as error:
        load_rows("ctrlora-tests/no-such-dataset", key="data.train")
    message = str(error.value)
    assert "data.train" in message and "no local copy" in message and "local .json/.jsonl/.parquet" in message

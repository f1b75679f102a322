"""Failure handling: a corpus cut short by a crash resumes cleanly; a damaged one is named."""
import json

import pytest

from spd_engine.corpus import read_corpus
from spd_engine.data import DataError

ROW = {"id": "a", "prompt": "p", "completion": "c", "finish_reason": "stop"}


def test_torn_last_line_is_dropped_and_cut_from_the_file_on_repair(tmp_path):
    path = tmp_path / "c.jsonl"
    good = json.dumps(ROW) + "\n" + json.dumps({**ROW, "id": "b"}) + "\n"
    path.write_text(good + '{"id": "c", "prom')
    assert [r["id"] for r in read_corpus(path)] == ["a", "b"]
    assert path.read_text() != good  # reading alone does not touch the file
    assert [r["id"] for r in read_corpus(path, repair=True)] == ["a", "b"]
    assert path.read_text() == good


def test_a_damaged_line_inside_the_corpus_is_reported_with_its_line_number(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(ROW) + "\nnot json\n")
    with pytest.raises(DataError, match="c.jsonl:2"):
        read_corpus(path)
    path.write_text(json.dumps(ROW) + "\n" + json.dumps({"id": "b", "prompt": "p"}) + "\n")
    with pytest.raises(DataError, match="c.jsonl:2: a corpus row needs"):
        read_corpus(path)


def test_missing_or_empty_corpus_reads_as_no_rows(tmp_path):
    assert read_corpus(tmp_path / "none.jsonl") == []
    (tmp_path / "e.jsonl").write_text("")
    assert read_corpus(tmp_path / "e.jsonl") == []

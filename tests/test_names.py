"""Client-chosen names never become paths outside their root: mode/adapter/job names and dataset names."""
from __future__ import annotations

from pathlib import Path

import pytest

from spd_engine.data import DataError, resolve_data
from spd_engine.paths import check_name, child


@pytest.mark.parametrize("name", ["good\n", "good\r\n", "good\n\n", "\ngood", "go\nod", "good ", "good/x", "..", ".",
                                  ".hidden", "", "x" * 65, "a\x00b", "naïve"])
def test_check_name_refuses_trailing_newlines_paths_and_odd_characters(name: str) -> None:
    with pytest.raises(ValueError, match="invalid subspace name"):
        check_name(name, "subspace name")


@pytest.mark.parametrize("name", ["good", "a", "A.b_c-1", "9lives", "x" * 64, "v1..2"])
def test_check_name_accepts_plain_names(name: str) -> None:
    assert check_name(name) == name


def test_child_of_a_name_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid mode"):
        child(tmp_path, "mode\n", "mode")
    assert child(tmp_path, "mode", "mode") == tmp_path.resolve() / "mode"


@pytest.mark.parametrize("name", [
    "bigbench/../../etc/passwd", "bigbench/..", "bigbench/arithmetic/..", "bigbench/../x.json",
    "bigbench//etc/passwd", "bigbench/", "bigbench/a/b/c", "bigbench/.hidden", "bigbench/snarks\n",
    "bigbench/a\\..\\..\\b",
])
def test_dataset_names_that_could_leave_the_data_dir_are_refused(name: str) -> None:
    with pytest.raises(DataError, match="invalid dataset name"):
        resolve_data(name)


def test_plain_bigbench_names_still_resolve_inside_the_data_dir(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setenv("SPD_DATA_DIR", str(tmp_path))
    assert resolve_data("bigbench/snarks") == tmp_path / "bigbench" / "snarks.json"
    sub = tmp_path / "bigbench" / "arithmetic" / "2_digit_addition.json"
    assert resolve_data("bigbench/arithmetic/2_digit_addition") == sub
    for name in ("bigbench/snarks", "bigbench/arithmetic/2_digit_addition"):
        assert resolve_data(name).resolve().is_relative_to((tmp_path / "bigbench").resolve())

import csv

import pytest

from fgvc.files import write_csv


def _read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_columns_and_rows_give_the_same_table(tmp_path):
    columns = write_csv(tmp_path / "columns.csv", {"name": ["a", "b"], "value": [0.5, float("nan")]})
    rows = write_csv(tmp_path / "rows.csv", [{"name": "a", "value": 0.5}, {"name": "b", "value": None}])
    assert _read(columns) == _read(rows) == [["name", "value"], ["a", "0.500000"], ["b", ""]]


def test_a_column_shorter_than_the_others_is_refused_not_cut(tmp_path):
    with pytest.raises(ValueError, match="shorter"):
        write_csv(tmp_path / "t.csv", {"name": ["a", "b", "c"], "value": [1, 2]})

"""evaluation.compare: the quickstart's side-by-side table."""
import json

import pytest

from errors import UserError
from evaluation.compare import comparison_table, main


def _report(folder, clean, rows):
    (folder / "eval").mkdir(parents=True)
    results = [{"label": a, "eps_str": e, "robust_accuracy": v} for a, e, v in rows]
    (folder / "eval" / "report.json").write_text(json.dumps({"clean_accuracy": clean, "results": results}))


def test_table_has_a_row_per_run_and_union_of_columns(tmp_path):
    _report(tmp_path / "a", 0.98, [("PGD-20", "16/255", 0.0), ("AA", "16/255", 0.0)])
    _report(tmp_path / "b", 0.875, [("PGD-20", "16/255", 0.635), ("AA", "16/255", 0.525), ("AA", "8/255", 0.7)])
    lines = comparison_table([str(tmp_path / "a"), str(tmp_path / "b")]).splitlines()
    assert lines[0] == "| run | clean | PGD-20 16/255 | AA 16/255 | AA 8/255 |"
    assert lines[2].endswith("| 98.00 | 0.00 | 0.00 |  |")
    assert lines[3].endswith("| 87.50 | 63.50 | 52.50 | 70.00 |")


def test_missing_report_is_a_user_error(tmp_path, capsys):
    with pytest.raises(UserError, match="eval_autoattack.py"):
        comparison_table([str(tmp_path)])
    assert main([str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1

"""Statistics of the reports: Wilson intervals, the paired difference, exact McNemar, per class, compare's pairing."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from evaluation import AttackResult, SuiteResult, SuiteSettings, write_reports
from evaluation.compare import compare, main
from evaluation.inputs import points_identity
from evaluation.stats import PairedTable, binomial_two_sided, wilson


def test_wilson_interval_matches_hand_computed_values():
    # 5 of 10: centre 0.5, half-width z / (n + z^2) * sqrt(n / 4 + z^2 / 4) = 0.263407
    assert wilson(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    # 0 of 10: [0, z^2 / (n + z^2)] = [0, 3.841459 / 13.841459]
    assert wilson(0, 10) == (0.0, pytest.approx(0.277533, abs=1e-6))
    assert wilson(10, 10) == (pytest.approx(0.722467, abs=1e-6), 1.0)
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, score method without continuity correction
    for (k, n), expected in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611),
                             (1, 29): (0.0061, 0.1718)}.items():
        assert wilson(k, n) == pytest.approx(expected, abs=1e-4), (k, n)
    assert all(math.isnan(v) for v in wilson(0, 0))


def test_exact_mcnemar_on_tables_with_known_p_values():
    # 1 vs 9 discordant points: 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * 11 / 1024
    assert PairedTable(40, 1, 9, 50).mcnemar_p() == pytest.approx(22 / 1024, rel=1e-12)
    assert PairedTable(3, 0, 5, 2).mcnemar_p() == pytest.approx(2 / 32, rel=1e-12)
    assert PairedTable(3, 0, 5, 2).mcnemar_p() == PairedTable(3, 5, 0, 2).mcnemar_p()
    assert PairedTable(10, 4, 4, 10).mcnemar_p() == 1.0 and PairedTable(10, 0, 0, 10).mcnemar_p() == 1.0
    # 6 vs 16: sum_{i<=6} C(22, i) = 110056, so p = 2 * 110056 / 2^22
    assert PairedTable(59, 6, 16, 80).mcnemar_p() == pytest.approx(2 * 110056 / 2**22, rel=1e-12)
    # large counts stay exact (no underflow): 2 * P(X <= 4800), X ~ Bin(10000, 1/2) ~ 6.59e-5 (normal: 6.3e-5)
    assert binomial_two_sided(4800, 10000) == pytest.approx(6.5935e-05, rel=1e-4)


def test_paired_difference_interval_matches_the_published_example():
    """Fagerland, Lydersen & Laake (2017), ch. 8, Cavo et al. (2012): 59, 6 / 16, 80; Newcombe's
    square-and-add interval for p1+ - p+1 is -0.0621 (-0.1186 to -0.0046). Here B - A = -(p1+ - p+1)."""
    t = PairedTable(both=59, only_a=6, only_b=16, neither=80)
    assert t.difference == pytest.approx(0.0621, abs=1e-4)
    low, high = t.difference_interval()
    assert low == pytest.approx(0.0046, abs=1e-4) and high == pytest.approx(0.1186, abs=1e-4)
    # no discordant points: the interval still has width (finite n), and it is symmetric under swapping
    low0, high0 = PairedTable(50, 0, 0, 50).difference_interval()
    assert low0 < 0 < high0 and low0 == pytest.approx(-high0)


def test_paired_table_counts_flags():
    a = torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 0, 1], dtype=torch.bool)
    t = PairedTable.from_flags(a, b)
    assert (t.both, t.only_a, t.only_b, t.neither) == (2, 1, 1, 1)
    assert t.accuracy_a == t.accuracy_b == 0.6 and t.difference == 0


# ------------------------------------------------------------------------------- reports, compare
def _result(clean: list[int], robust: list[int], labels: list[int]) -> SuiteResult:
    settings = SuiteSettings.build([8 / 255], ["pgd10"])
    result = SuiteResult(settings, torch.tensor(labels), torch.tensor(clean, dtype=torch.bool))
    result.results[(8 / 255, "pgd10")] = AttackResult("pgd10", 8 / 255, torch.tensor(robust, dtype=torch.bool),
                                                      sum(clean), 0.0, 0)
    return result


def _write(folder, result: SuiteResult, dataset: str = "digits", images: torch.Tensor | None = None) -> None:
    images = torch.zeros(result.n, 3, 2, 2) if images is None else images
    data = {"dataset": dataset, "split": "test", "n": result.n, "points": points_identity(images, result.labels)}
    write_reports(result, folder / "eval", {"data": data, "model": {"source": str(folder)}})


LABELS = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]


def test_report_carries_intervals_and_per_class_accuracy(tmp_path):
    result = _result([1, 1, 1, 1, 1, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 1, 1, 1, 0], LABELS)
    _write(tmp_path, result)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["clean_ci95"] == pytest.approx(list(wilson(9, 10)))
    row = next(r for r in report["results"] if r["attack"] == "pgd10")
    assert row["robust_count"] == 5 and row["ci95"] == pytest.approx(list(wilson(5, 10)))
    per_class = report["per_class"]
    assert per_class["classes"] == [0, 1, 2] and per_class["n"] == [3, 3, 4] and per_class["clean"] == [3, 2, 4]
    assert per_class["robust"]["8/255"]["worst"] == [2, 0, 3]
    assert per_class["worst_class"]["8/255"]["class"] == 1
    frame = pd.read_csv(tmp_path / "eval" / "per_class.csv", index_col=0)
    assert frame.loc[2, "worst@8/255"] == 75.0 and frame.loc[1, "clean"] == pytest.approx(66.67)
    assert frame.loc[2, "worst@8/255_ci_low"] == pytest.approx(100 * wilson(3, 4)[0], abs=0.006)
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "50.00 [23.66, 76.34]" in md and "8/255: class 1, 0.00 [0.00, 56.15] of 3 points" in md


def test_compare_pairs_runs_on_the_same_points(tmp_path, capsys):
    a = _result([1] * 10, [1, 1, 1, 1, 1, 1, 0, 0, 0, 0], LABELS)
    b = _result([1] * 9 + [0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 0], LABELS)
    _write(tmp_path / "a", a)
    _write(tmp_path / "b", b)
    text = compare([str(tmp_path / "a"), str(tmp_path / "b")])
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| 8/255") or line.startswith("| -")}
    clean, pgd = rows["Clean"], rows["PGD-10"]
    assert clean[2:5] == ["100.00", "90.00", "-10.00"] and clean[6:8] == ["1", "0"] and clean[8] == "1"
    assert pgd[2:5] == ["60.00", "90.00", "+30.00"] and pgd[6:8] == ["0", "3"]
    assert float(pgd[8]) == pytest.approx(0.25)  # 0 vs 3 discordant: 2 / 2^3
    low, high = PairedTable(6, 0, 3, 1).difference_interval()
    assert pgd[5] == f"[{100 * low:+.2f}, {100 * high:+.2f}]"
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "McNemar p" in capsys.readouterr().out


def _norm_result(norm: str, robust: list[int]) -> SuiteResult:
    settings = SuiteSettings.build([1.0], ["pgd10"], norm=norm)
    result = SuiteResult(settings, torch.tensor(LABELS), torch.ones(10, dtype=torch.bool))
    result.results[(1.0, "pgd10")] = AttackResult("pgd10", 1.0, torch.tensor(robust, dtype=torch.bool), 10, 0.0, 0)
    return result


def test_compare_pairs_each_norm_with_the_same_norm(tmp_path):
    # A's main norm is L2 and B's is L1, both at radius 1 (written "1" in both): each norm's flags must be
    # paired with the other run's flags of that norm, not with whatever its main part holds at "1".
    from evaluation.sections import NormSection

    l2_a, l1_a = [1] * 8 + [0] * 2, [1] * 2 + [0] * 8
    l2_b, l1_b = [1] * 9 + [0], [1] * 3 + [0] * 7
    for name, (first, section) in {"a": (_norm_result("L2", l2_a), _norm_result("L1", l1_a)),
                                  "b": (_norm_result("L1", l1_b), _norm_result("L2", l2_b))}.items():
        data = {"dataset": "digits", "split": "test", "n": 10,
                "points": points_identity(torch.zeros(10, 3, 2, 2), first.labels)}
        write_reports(first, tmp_path / name / "eval", {"data": data, "model": {}}, [NormSection(section)])
    text = compare([str(tmp_path / "a"), str(tmp_path / "b")])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[3:-1]]
            for line in text.splitlines() if "| PGD-10 |" in line}
    assert rows["L2 1"][:2] == ["80.00", "90.00"] and rows["L2 1"][4:6] == ["0", "1"]
    assert rows["L1 1"][:2] == ["20.00", "30.00"] and rows["L1 1"][4:6] == ["0", "1"]


@pytest.mark.parametrize("change,expect", [
    ("labels", "labels differ"), ("images", "images differ"), ("dataset", "dataset digits vs cifar10"),
    ("n", "n 10 vs 9"),
])
def test_compare_refuses_runs_on_different_points(tmp_path, capsys, change, expect):
    a = _result([1] * 10, [1] * 10, LABELS)
    _write(tmp_path / "a", a)
    if change == "labels":
        _write(tmp_path / "b", _result([1] * 10, [1] * 10, LABELS[::-1]))
    elif change == "images":
        _write(tmp_path / "b", a, images=torch.ones(10, 3, 2, 2))
    elif change == "dataset":
        _write(tmp_path / "b", a, dataset="cifar10")
    else:
        _write(tmp_path / "b", _result([1] * 9, [1] * 9, LABELS[:9]))
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot pair") and expect in lines[0], out.err
    assert out.out == ""
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--unpaired"]) == 0  # the table alone still works

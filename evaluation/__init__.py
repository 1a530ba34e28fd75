"""Evaluation: the multi-epsilon attack suite, worst case, sanity checks, common corruptions, reports and plots."""
from .checks import sanity_checks
from .corruptions import CorruptionSettings, run_corruptions
from .inputs import load_eval_data
from .malt_runner import MALT  # noqa: F401  (registers the malt attack in spec.ATTACKS)
from .report import (
           environment_info,
           report_dict,
           table_attacks,
           table_eps,
           write_reports,
)
from .results import AttackResult, SuiteResult, SuiteSettings, attack_seed
from .spec import AttackSpec, parse_attack, parse_attacks
from .store import ResultStore
from .suite import run_suite, summary_line

__all__ = ["AttackResult", "AttackSpec", "CorruptionSettings", "ResultStore", "SuiteResult", "SuiteSettings",
           "attack_seed", "run_corruptions",
           "environment_info", "load_eval_data", "parse_attack", "parse_attacks", "report_dict",
           "run_suite", "sanity_checks", "summary_line", "table_attacks", "table_eps", "write_reports"]

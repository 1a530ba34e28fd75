"""RobustBench export, one focused module per part of a submission.

- :mod:`export.arch`: which RobustBench constructor rebuilds a model (and back), the zoo entry;
- :mod:`export.weights`: weights in RobustBench's key layout, ``.pt``/``.safetensors``, verification;
- :mod:`export.boards`: RobustBench's boards (Linf, L2, corruptions) and the figures each takes from a report;
- :mod:`export.model_info`: the ``model_info`` JSON of each board;
- :mod:`export.roundtrip`: the zoo entry through RobustBench's own ``load_model``, as a maintainer loads it;
- :mod:`export.claim`: RobustBench's own ``benchmark`` on that model, offline, per board;
- :mod:`export.submission`: :func:`export`, which plans, writes and checks a whole submission.
"""
from .arch import (
                   LOGIT_TOLERANCE,
                   SUPPORTED,
                   RobustBenchArch,
                   install_robustbench,
                   max_logit_diff,
                   probe_batch,
                   project_model_from_robustbench,
                   robustbench_arch,
                   zoo_entry_source,
)
from .boards import (
                   BOARDS,
                   CORRUPTIONS_BOARD,
                   STANDARD_EPS,
                   THREAT_MODELS,
                   ZOO_LISTS,
                   CorruptionFigures,
                   Figures,
                   boards_for,
)
from .claim import FULL_TEST_SET, RB_DATASETS, claim_corruptions_root, claim_data_root, run_claim
from .model_info import (
                   CORRUPTIONS_INFO_FIELDS,
                   MODEL_INFO_FIELDS,
                   ModelCard,
                   board_fields,
                   build_corruptions_info,
                   build_model_info,
                   pct,
                   validate_model_info,
)
from .roundtrip import load_as_maintainer, verify_as_maintainer, zoo_with_entry
from .submission import (
                   FORMATS,
                   WEIGHT_CHOICES,
                   BoardExport,
                   ExportRequest,
                   ExportResult,
                   default_model_name,
                   default_out,
                   export,
)
from .weights import (
                   ExportMismatch,
                   file_sha256,
                   load_into_robustbench,
                   load_weights,
                   robustbench_state_dict,
                   save_weights,
                   verify_export,
)

__all__ = [
    "BOARDS", "CORRUPTIONS_BOARD", "CORRUPTIONS_INFO_FIELDS", "FORMATS", "FULL_TEST_SET", "LOGIT_TOLERANCE",
    "MODEL_INFO_FIELDS", "RB_DATASETS", "STANDARD_EPS", "SUPPORTED", "THREAT_MODELS", "WEIGHT_CHOICES", "ZOO_LISTS",
    "BoardExport", "CorruptionFigures", "ExportMismatch", "ExportRequest", "ExportResult", "Figures", "ModelCard",
    "RobustBenchArch", "board_fields", "boards_for", "build_corruptions_info", "build_model_info",
    "claim_corruptions_root", "claim_data_root", "default_model_name", "default_out", "export",
    "file_sha256", "install_robustbench", "load_as_maintainer", "load_into_robustbench", "load_weights", "max_logit_diff", "pct",
    "probe_batch", "project_model_from_robustbench", "robustbench_arch", "robustbench_state_dict", "run_claim",
    "save_weights", "validate_model_info", "verify_as_maintainer", "verify_export", "zoo_entry_source",
    "zoo_with_entry",
]

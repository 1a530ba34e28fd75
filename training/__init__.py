"""Training: config, schedules, AWP, weight averaging, distributed helpers and the Trainer."""
from .config import TrainConfig, build_config, parse_eps

__all__ = ["TrainConfig", "build_config", "parse_eps"]

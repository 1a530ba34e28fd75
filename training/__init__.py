"""Training: config, methods, schedules, AWP, weight averaging, the step and the Trainer."""
from .config import TrainConfig, build_config, parse_eps

__all__ = ["TrainConfig", "build_config", "parse_eps"]

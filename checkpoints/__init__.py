"""Checkpoint files: atomic save, safe load, run-folder lookup, RobustBench export."""
from .io import load_checkpoint, save_checkpoint

__all__ = ["load_checkpoint", "save_checkpoint"]

"""Checkpoint files: atomic save, safe load, resume fallbacks, and loading models from run folders."""
from .io import load_checkpoint, save_checkpoint

__all__ = ["load_checkpoint", "save_checkpoint"]

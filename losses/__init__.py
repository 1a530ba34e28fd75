"""Losses: KL (TRADES), DKL/IKL/GKL as one implementation with options, and the class score bank."""
from losses.gkl import GKLLoss, gkl_kd, gkl_loss, kl_divergence, kl_loss
from losses.score_bank import ScoreBank

__all__ = ["GKLLoss", "gkl_loss", "kl_divergence", "kl_loss", "gkl_kd", "ScoreBank"]

"""SCoRe (Kumar et al. 2024, arXiv 2409.12917) on TRL's RLOOTrainer."""

from .config import MATH_CORRECTION_INSTRUCTION, SCoReConfig
from .trainer import SCoReTrainer


__all__ = ["MATH_CORRECTION_INSTRUCTION", "SCoReConfig", "SCoReTrainer"]
__version__ = "0.1.0"

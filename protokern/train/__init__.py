"""ProtoPNet training: ``python -m protokern.train`` or :func:`main` (see ``protokern.train.main``).

Stages, learning rates, losses and push follow the original implementation (Chen et al. 2019); presets
``demo`` (CPU, synthetic data; the default), ``cub`` and ``cars``.
"""

from protokern.train.config import PRESETS, TrainConfig, parse_config, preset_config
from protokern.train.main import Trainer, main, train

__all__ = ["PRESETS", "TrainConfig", "Trainer", "main", "parse_config", "preset_config", "train"]

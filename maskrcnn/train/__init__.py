"""Training: the engine behind ``maskrcnn train``.

Reproducible and resumable: the sample order comes from (seed, epoch), augmentations from
(seed, epoch, index), and checkpoints carry the model, optimizer, counters and RNG state, so a
run resumed from ``last.pt`` continues exactly as if it had never stopped.

- :mod:`.engine`: ``Trainer``, the loop (``run``, ``train_step``) that calls the hooks
- :mod:`.hooks`: time budget, non-finite steps, progress, metrics log, validation, checkpoints
- :mod:`.signal_hook`: ``SignalStop``, the hook that ends a run cleanly on SIGINT, SIGTERM, SIGUSR1
- :mod:`.setup`: ``TrainOptions``, data checks and splits, building the model and optimizer
- :mod:`.loading`: ``BatchLoader``, each step's samples, read inline or by DataLoader workers
- :mod:`.schedule`: the learning rate (warm-up, cosine decay) and the time budget's length
"""

from .engine import Trainer, TrainResult, train
from .hooks import MAX_BAD_STEPS, HookBase
from .schedule import LR_FLOOR, learning_rate
from .setup import FINETUNE_LR, SCRATCH_LR, TrainOptions

__all__ = ["FINETUNE_LR", "HookBase", "LR_FLOOR", "MAX_BAD_STEPS", "SCRATCH_LR", "TrainOptions", "TrainResult", "Trainer", "learning_rate",
           "train"]

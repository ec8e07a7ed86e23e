"""Training: train state, pure train step, optimizer, sharding, checkpoints, metrics, the loop."""

from diffjax.training.checkpoint import Checkpointer, CheckpointError
from diffjax.training.config import ConfigError, base_config, validate_config
from diffjax.training.loop import TrainingStopped, evaluate, prepare_run, sample_from_checkpoint, train
from diffjax.training.state import TrainState, create_train_state, make_optimizer, make_train_step

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "ConfigError",
    "TrainState",
    "TrainingStopped",
    "base_config",
    "create_train_state",
    "evaluate",
    "make_optimizer",
    "make_train_step",
    "prepare_run",
    "sample_from_checkpoint",
    "train",
    "validate_config",
]

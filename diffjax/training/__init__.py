"""Training: train state and the train-step factory, the run built from a config, sharding,
checkpoints, metrics, the loop, `load_run` for a trained run (`save_run_weights`: its EMA weights
as one file), and post-hoc EMA (`posthoc_ema`)."""

from diffjax.training.checkpoint import Checkpointer, CheckpointError
from diffjax.training.config import ConfigError, base_config, validate_config
from diffjax.training.images import save_image_grid
from diffjax.training.inverse import reconstruct_from_checkpoint
from diffjax.training.load import LoadedRun, load_run, save_run_weights
from diffjax.training.loop import TrainingStopped, evaluate, prepare_training, sample_from_checkpoint, train
from diffjax.training.posthoc_ema import power_ema, reconstruct_posthoc_ema
from diffjax.training.run import Run, build_run, check_environment
from diffjax.training.state import (
    ParamAverage,
    TrainState,
    create_train_state,
    ema,
    make_optimizer,
    make_train_step,
    stream_key,
)

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "ConfigError",
    "LoadedRun",
    "ParamAverage",
    "Run",
    "TrainState",
    "TrainingStopped",
    "base_config",
    "build_run",
    "check_environment",
    "create_train_state",
    "ema",
    "evaluate",
    "load_run",
    "make_optimizer",
    "make_train_step",
    "power_ema",
    "prepare_training",
    "reconstruct_from_checkpoint",
    "reconstruct_posthoc_ema",
    "sample_from_checkpoint",
    "save_image_grid",
    "save_run_weights",
    "stream_key",
    "train",
    "validate_config",
]

"""Discrete diffusion through the shared trainer: configs/text_masked.py and configs/mnist_masked.py
shrunk to seconds train, checkpoint, resume, evaluate (bits per dim from the -ELBO) and sample through
the same `train` / `evaluate` / `sample_from_checkpoint` / `load_run` as the Gaussian runs; bad
discrete values are ConfigErrors before anything is built."""

import json
import math
import os

import jax
import numpy as np
import pytest

from diffjax.training import ConfigError, evaluate, load_run, sample_from_checkpoint, train, validate_config
from diffjax.training.discrete_run import make_run_iterator


def tiny_text_config(**train_overrides):
    from configs.text_masked import get_config

    config = get_config()
    config.discrete.sequence_length = 16
    config.discrete.elbo_samples = 2
    config.discrete.model_options = {"hidden_size": 32, "depth": 1, "num_heads": 2, "frequency_embedding_size": 32}
    config.optim.update(warmup_steps=1, schedule="constant")
    config.train.update(
        num_steps=4, batch_size=8, log_every=2, checkpoint_every=2, progress_bar=False, async_checkpointing=False
    )
    config.train.update(train_overrides)
    config.sample.update(num_samples=3, steps=4)
    config.eval.update(batch_size=8, loss_batches=1, bits_per_dim_examples=12)
    return config


def tiny_mnist_config():
    from configs.mnist_masked import get_config

    config = get_config()
    config.data.image_size = 7
    config.discrete.elbo_samples = 2
    config.discrete.model_options = {"hidden_size": 32, "depth": 1, "num_heads": 2, "frequency_embedding_size": 32}
    config.optim.update(warmup_steps=1, schedule="constant")
    config.train.update(num_steps=2, batch_size=8, log_every=1, checkpoint_every=2, progress_bar=False)
    config.train.async_checkpointing = False
    config.sample.update(num_samples=4, steps=3)
    config.eval.update(batch_size=8, loss_batches=1, bits_per_dim_examples=8)
    return config

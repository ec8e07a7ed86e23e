"""Masked diffusion on characters, and the base of the discrete family (configs/mnist_masked.py starts
from it): windows of 64 characters of the stdlib-docstring corpus (`diffjax.data.text`, offline, PSF
licence, train / validation split by file), a SequenceTransformer (hidden 128, depth 3) with RADD's
time-free parameterisation, the linear masking schedule and the continuous-time masked ELBO. Eval
reports validation bits per character (-ELBO) and writes text samples (ancestral, cached)."""

from diffjax.training.config import base_config


def get_config():
    config = base_config()
    config.discrete.process = "masked"
    config.discrete.tokens = "text"
    config.discrete.sequence_length = 64
    config.discrete.loss = "masked_elbo"
    config.discrete.time_free = True
    config.discrete.sampler = "ancestral"
    config.discrete.cache = True
    config.discrete.elbo_samples = 8
    config.discrete.model_options = {"hidden_size": 128, "depth": 3}  # 4 heads (the default)

    config.optim.name = "adam"
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 50
    config.optim.schedule = "cosine"
    config.optim.min_lr_ratio = 0.1

    config.train.num_steps = 2000
    config.train.batch_size = 64
    config.train.ema_decay = 0.99
    config.train.log_every = 50
    config.train.checkpoint_every = 500

    config.sample.num_samples = 8
    config.sample.steps = 256  # 4 x the window length; caching skips the steps that reveal nothing

    config.eval.fid = False
    config.eval.batch_size = 128
    config.eval.loss_batches = 4
    config.eval.bits_per_dim_examples = 512
    return config

"""The embedded default: 8x8 digits from scikit-learn (1,797 images, offline), upscaled to 16x16,
a small U-Net, a few minutes of training on 2 CPU cores, then a grid of samples."""

from diffjax.data import default_data_config
from diffjax.training.config import base_config, model_overrides, process_options


def get_config():
    config = base_config()
    config.data = default_data_config("digits")

    config.process.name = "edm"
    config.process.options = process_options("edm")
    config.loss.prediction = "edm"  # EDM preconditioning, F target, lognormal sigma
    config.loss.time_sampler = "lognormal"
    config.loss.sigma_data = 0.5

    config.model.name = "unet-small"
    # One residual block per level keeps a step at ~0.2 s on 2 CPU cores; EDM feeds log(sigma)/4.
    config.model.overrides = model_overrides("unet-small", num_res_blocks=1, time_scale=250.0)

    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.optim.schedule = "cosine"
    config.optim.min_lr_ratio = 0.1

    config.train.num_steps = 2000
    config.train.batch_size = 32
    config.train.ema_decay = 0.995
    config.train.log_every = 50
    config.train.checkpoint_every = 500

    config.sample.num_samples = 64
    config.sample.steps = 20
    return config

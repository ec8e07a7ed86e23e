"""The embedded default, and the base of the small-image family (configs/mnist.py starts from it):
8x8 digits from scikit-learn (1,797 images, offline), upscaled to 16x16, a small U-Net with EDM
preconditioning, 2,000 steps on CPU (see the README for how long), then a grid of samples."""

from diffjax.data import default_data_config
from diffjax.training.config import base_config, model_preset_overrides


def get_config():
    config = base_config()
    config.data = default_data_config("digits")

    config.process.name = "edm"
    config.loss.prediction = (
        "edm_preconditioned"  # EDM preconditioning, F target (the network sees c_noise = log(sigma) / 4)
    )
    config.loss.time_sampler = "lognormal"  # EDM's log sigma ~ N(-1.2, 1.2^2): the sampler's defaults
    config.loss.sigma_data = 0.5

    config.model.name = "unet-small"
    config.model.overrides = model_preset_overrides("unet-small", num_res_blocks=1)  # a fast step on 2 CPU cores

    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.optim.schedule = "cosine"
    config.optim.min_lr_ratio = 0.1

    config.train.num_steps = 2000
    config.train.batch_size = 32
    config.train.ema_decay = 0.995
    config.train.log_every = 50
    config.train.checkpoint_every = 500

    config.mesh.cpu_devices = 0  # a CPU-only host split into one device per core (README, Performance)

    config.sample.num_samples = 64
    config.sample.steps = 20
    return config

"""MNIST 28x28 (from ../shared/data/mnist.npz, or TFDS when prepared), class-conditional small
U-Net trained with label dropout for classifier-free guidance."""

from diffjax.data import default_data_config
from diffjax.training.config import base_config, model_overrides, process_options


def get_config():
    config = base_config()
    config.data = default_data_config("mnist")

    config.process.name = "edm"
    config.process.options = process_options("edm")
    config.loss.prediction = "edm"
    config.loss.time_sampler = "lognormal"

    config.model.name = "unet-small"
    config.model.class_conditional = True
    config.model.overrides = model_overrides(
        "unet-small", image_size=28, time_scale=250.0, attn_resolutions=(7,)
    )

    config.optim.learning_rate = 5e-4
    config.optim.warmup_steps = 200
    config.optim.schedule = "cosine"
    config.optim.min_lr_ratio = 0.1

    config.train.num_steps = 20_000
    config.train.batch_size = 128
    config.train.ema_decay = 0.999
    config.train.label_dropout = 0.1
    config.train.checkpoint_every = 1000
    config.train.sample_every = 2000

    config.sample.num_samples = 100
    config.sample.steps = 20
    return config

"""MNIST 28x28 (mnist.npz in the shared data directory, or TFDS when prepared): the small-image family
(configs/default.py) with a class-conditional small U-Net trained with label dropout for
classifier-free guidance, longer and with larger batches."""

from configs import default
from diffjax.data import default_data_config
from diffjax.training.config import model_preset_overrides


def get_config():
    config = default.get_config()
    config.data = default_data_config("mnist")

    config.model.class_conditional = True
    config.model.overrides = model_preset_overrides("unet-small", image_size=28, attn_resolutions=(7,))

    config.optim.learning_rate = 5e-4
    config.optim.warmup_steps = 200

    config.train.num_steps = 20_000
    config.train.batch_size = 128
    config.train.ema_decay = 0.999
    config.train.label_dropout = 0.1
    config.train.checkpoint_every = 1000
    config.train.sample_every = 2000

    config.sample.num_samples = 100
    return config

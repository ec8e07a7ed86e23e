"""The CIFAR-10 family's shared recipe, which the cifar10_* configs start from and change.

score_sde's CIFAR-10 training settings (Song et al. 2021, configs/default_cifar10_configs.py): the
JPEG CIFAR-10 with random horizontal flips, data in [-1, 1]; Adam at lr 2e-4 after 5000 warm-up
steps, gradient clipping at 1; batch 128 for 1.3M steps, EMA 0.9999 without warm-up; 1000 sampling
steps on the uniform grid. Not an experiment by itself (FAMILY_BASE): it leaves the process, the
model and the sampler to the configs that use it.
"""

from diffjax.data import default_data_config
from diffjax.training.config import base_config

FAMILY_BASE = True


def get_config():
    config = base_config()
    config.seed = 42
    config.data = default_data_config("cifar10")  # random_flip=True

    config.optim.name = "adam"
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 5000
    config.optim.grad_clip = 1.0

    config.train.num_steps = 1_300_000
    config.train.batch_size = 128
    config.train.ema_decay = 0.9999
    config.train.ema_warmup = False
    config.train.log_every = 100
    config.train.checkpoint_every = 10_000
    config.train.sample_every = 50_000

    config.sample.steps = 1000
    config.sample.grid = "uniform"
    return config

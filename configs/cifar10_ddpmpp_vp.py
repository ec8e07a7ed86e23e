"""DDPM++ (continuous) on CIFAR-10 with the VP SDE: Song et al. 2021, "Score-Based Generative Modeling
through Stochastic Differential Equations", Table 3 "DDPM++ cont. (VP)" (FID 2.55, 61.8M parameters).

Settings of score_sde's configs/vp/cifar10_ddpmpp_continuous.py: VP SDE with beta in [0.1, 20], the
network fed 999 t and trained on eps (its score is -eps / sigma, reduce_mean), t ~ U[t_min, 1];
Adam lr 2e-4, 5000 warm-up steps, gradient clipping at 1, batch 128, 1.3M steps, EMA 0.9999 (no
warm-up), dropout 0.1, random horizontal flips, data in [-1, 1]. Samples: Euler-Maruyama on the
reverse SDE with 1000 steps (the paper's PC sampler without corrector).
Differences: t_min is 1e-3 (score_sde trains from 1e-5 and samples to 1e-3).
"""

from diffjax.data import default_data_config
from diffjax.training.config import base_config, model_overrides, process_options

MODEL = "DDPM++-cifar10"


def get_config():
    config = base_config()
    config.seed = 42
    config.data = default_data_config("cifar10")  # random_flip=True

    config.process.name = "vp"
    config.process.options = process_options("vp", beta_min=0.1, beta_max=20.0)
    config.loss.prediction = "eps"
    config.loss.weighting = "uniform"
    config.loss.time_sampler = "uniform"

    config.model.name = MODEL
    config.model.overrides = model_overrides(MODEL)  # time_scale 999, dropout 0.1

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

    config.sample.solver = "euler_maruyama"
    config.sample.steps = 1000
    config.sample.grid = "uniform"
    return config

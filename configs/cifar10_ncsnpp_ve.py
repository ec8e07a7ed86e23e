"""NCSN++ (continuous) on CIFAR-10 with the VE SDE: Song et al. 2021, "Score-Based Generative Modeling
through Stochastic Differential Equations", Table 3 "NCSN++ cont. (VE)" (FID 2.38, 62.8M parameters).

Settings of score_sde's configs/ve/cifar10_ncsnpp_continuous.py: VE SDE with sigma in [0.01, 50],
Gaussian Fourier features (scale 16) of log sigma, the output divided by sigma (= an eps-predictor,
unweighted loss), t ~ U[0, 1]; Adam lr 2e-4, 5000 warm-up steps, gradient clipping at 1, batch 128,
1.3M steps, EMA 0.999 (no warm-up), dropout 0.1, random horizontal flips. Samples: the PC sampler,
reverse diffusion + one Langevin step at snr 0.16, 1000 steps.

The network embeds time_scale * t = log(sigma / sigma_min), log sigma up to a constant shift.
Differences: score_sde trains VE models on data in [0, 1] with the loss summed over pixels; here data
are in [-1, 1] and the loss is a mean (EDM's re-implementation on [-1, 1] uses sigma in [0.02, 100]:
--config.process.options.sigma_min=0.02 --config.process.options.sigma_max=100).
"""

import math

from diffjax.data import default_data_config
from diffjax.training.config import base_config, model_overrides, process_options

MODEL = "NCSN++-cifar10"
SIGMA_MIN, SIGMA_MAX = 0.01, 50.0


def get_config():
    config = base_config()
    config.seed = 42
    config.data = default_data_config("cifar10")  # random_flip=True

    config.process.name = "ve"
    config.process.options = process_options("ve", sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    config.loss.prediction = "eps"
    config.loss.weighting = "uniform"
    config.loss.time_sampler = "uniform"

    config.model.name = MODEL
    config.model.overrides = model_overrides(MODEL, time_scale=math.log(SIGMA_MAX / SIGMA_MIN))

    config.optim.name = "adam"
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 5000
    config.optim.grad_clip = 1.0

    config.train.num_steps = 1_300_000
    config.train.batch_size = 128
    config.train.ema_decay = 0.999
    config.train.ema_warmup = False
    config.train.log_every = 100
    config.train.checkpoint_every = 10_000
    config.train.sample_every = 50_000

    config.sample.solver = "pc"
    config.sample.steps = 1000
    config.sample.grid = "uniform"
    config.sample.solver_options.snr = 0.16
    config.sample.solver_options.n_corrector = 1
    return config

"""NCSN++ (continuous) on CIFAR-10 with the VE SDE: Song et al. 2021, "Score-Based Generative Modeling
through Stochastic Differential Equations", Table 3 "NCSN++ cont. (VE)" (FID 2.38, 62.8M parameters).

Settings of score_sde's configs/ve/cifar10_ncsnpp_continuous.py: the family recipe (cifar10_base.py)
with EMA 0.999, the VE SDE with sigma in [0.01, 50], Gaussian Fourier features (scale 16) of log
sigma, the output divided by sigma (= an eps-predictor, unweighted loss), t ~ U[0, 1], dropout 0.1.
Samples: the PC sampler, reverse diffusion + one Langevin step at snr 0.16, 1000 steps.

The network embeds time_scale * t = log(sigma / sigma_min), log sigma up to a constant shift.
Differences: score_sde trains VE models on data in [0, 1] with the loss summed over pixels; here data
are in [-1, 1] and the loss is a mean (EDM's re-implementation on [-1, 1] uses sigma in [0.02, 100]:
--config.process.options.sigma_min=0.02 --config.process.options.sigma_max=100).
"""

import math

from configs import cifar10_base
from diffjax.training.config import model_preset_overrides, process_options

MODEL = "NCSN++-cifar10"
SIGMA_MIN, SIGMA_MAX = 0.01, 50.0


def get_config():
    config = cifar10_base.get_config()
    config.train.ema_decay = 0.999

    config.process.name = "ve"
    config.process.options = process_options("ve", sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    config.loss.prediction = "eps"
    config.loss.weighting = "constant"
    config.loss.time_sampler = "uniform"

    config.model.name = MODEL
    config.model.overrides = model_preset_overrides(MODEL, time_scale=math.log(SIGMA_MAX / SIGMA_MIN))

    config.sample.solver = "pc"
    config.sample.solver_options.snr = 0.16
    config.sample.solver_options.n_corrector = 1
    return config

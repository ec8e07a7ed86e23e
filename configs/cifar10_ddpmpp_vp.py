"""DDPM++ (continuous) on CIFAR-10 with the VP SDE: Song et al. 2021, "Score-Based Generative Modeling
through Stochastic Differential Equations", Table 3 "DDPM++ cont. (VP)" (FID 2.55, 61.8M parameters).

Settings of score_sde's configs/vp/cifar10_ddpmpp_continuous.py: the family recipe (cifar10_base.py),
with the VP SDE with beta in [0.1, 20], the network fed 999 t and trained on eps (its score is
-eps / sigma, reduce_mean), t ~ U[t_min, 1], dropout 0.1. Samples: Euler-Maruyama on the reverse SDE
with 1000 steps (the paper's PC sampler without corrector).
Differences: t_min is 1e-3 (score_sde trains from 1e-5 and samples to 1e-3).
"""

from configs import cifar10_base
from diffjax.training.config import model_preset_overrides, process_options

MODEL = "DDPM++-cifar10"


def get_config():
    config = cifar10_base.get_config()

    config.process.name = "vp"
    config.process.options = process_options("vp", beta_min=0.1, beta_max=20.0)
    config.loss.prediction = "eps"
    config.loss.weighting = "constant"
    config.loss.time_sampler = "uniform"

    config.model.name = MODEL
    config.model.overrides = model_preset_overrides(MODEL)  # the preset: time_scale 999, dropout 0.1

    config.sample.solver = "euler_maruyama"
    return config

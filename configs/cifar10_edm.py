"""EDM on CIFAR-10: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", unconditional DDPM++ config F (Table 2: FID 1.97 with 35 NFE, 55.73M parameters).

Settings of EDM's train.py for CIFAR-10 (--arch=ddpmpp --precond=edm --batch=512 --lr=10e-4
--ema=0.5 --dropout=0.13 --augment=0.12 --duration=200), as changes to the family recipe
(cifar10_base.py): EDM preconditioning with sigma_data 0.5, log sigma ~ N(-1.2, 1.2^2) (the
lognormal time sampler's defaults), loss weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
(= unit weight on the raw network's target); the re-tuned DDPM++ with 3 levels of 256 channels fed
c_noise = log(sigma) / 4; Adam (0.9, 0.999, eps 1e-8) at lr 1e-3 after a linear warm-up over
10 Mimg, no gradient clipping; batch 512 for 200 Mimg; EMA half-life 0.5 Mimg. Samples: the
deterministic Heun sampler, 18 steps on the rho = 7 grid, sigma in [0.002, 80].

Differences: EDM's EMA is a half-life in images, which at batch 512 is the per-step decay
0.5^(512 / 500000) = 0.99929; its ramp-up (half-life <= 5 % of the images seen) is close to the
ema_warmup decay (1 + s) / (10 + s). EDM's non-leaking augmentation (p = 0.12, with the network
conditioned on the augmentation) is not available; random horizontal flips stand in for it.
"""

from configs import cifar10_base
from diffjax.training.config import model_preset_overrides, process_options

MODEL = "DDPM++-cifar10-edm"
BATCH = 512


def get_config():
    config = cifar10_base.get_config()
    config.seed = 0

    config.process.name = "edm"
    config.process.options = process_options("edm", sigma_min=0.002, sigma_max=80.0)
    config.loss.prediction = "edm_preconditioned"
    config.loss.weighting = "constant"
    config.loss.time_sampler = "lognormal"
    config.loss.sigma_data = 0.5

    config.model.name = MODEL
    config.model.overrides = model_preset_overrides(MODEL)  # the preset: dropout 0.13, time_scale 1 (c_noise)

    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 10_000_000 // BATCH  # 10 Mimg
    config.optim.grad_clip = 0.0

    config.train.num_steps = 200_000_000 // BATCH  # 200 Mimg
    config.train.batch_size = BATCH
    config.train.ema_decay = 0.5 ** (BATCH / 500_000)  # half-life 0.5 Mimg
    config.train.ema_warmup = True
    config.train.checkpoint_every = 5000

    config.sample.solver = "edm_heun"
    config.sample.steps = 18
    config.sample.grid = "karras"
    config.sample.grid_options.rho = 7.0
    return config

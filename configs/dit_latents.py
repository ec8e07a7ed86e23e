"""DiT-XL/2 on 32x32x4 latents (ImageNet 256x256 through the Stable Diffusion VAE): Peebles & Xie
2023, "Scalable Diffusion Models with Transformers" (Table 4: 675M parameters, 118.6 GMACs).

BENCHMARK-ONLY: the data pipeline reads uint8 images with 1 or 3 channels, not float latents, so
`prepare_run` cannot build this config (its data section is a placeholder). The train-step
benchmark (experiments/benchmarks/train_step.py) builds it with synthetic latents of shape
LATENT_SHAPE and NUM_CLASSES labels; tests/test_configs.py checks that it does.

Paper settings: class-conditional on 1000 classes with label dropout 0.1 (classifier-free guidance),
the 1000-step DDPM chain with linear betas 1e-4 .. 0.02 and an eps-prediction (unweighted) loss;
AdamW at a constant lr 1e-4, no weight decay, no warm-up and no gradient clipping, batch 256,
400K steps, EMA 0.9999; random horizontal flips. Samples: 250 DDPM (ancestral) steps with guidance
scale 1.5. Difference: the reference predicts a learned variance too; this model predicts eps only.
"""

from diffjax.training.config import base_config, model_preset_overrides, process_options

BENCHMARK_ONLY = True
LATENT_SHAPE = (32, 32, 4)
NUM_CLASSES = 1000
MODEL = "DiT-XL/2"


def get_config():
    config = base_config()
    config.data.name = "custom"  # a placeholder for ImageNet 256x256 SD-VAE latents: see BENCHMARK_ONLY
    config.data.image_size = LATENT_SHAPE[0]
    config.data.num_classes = NUM_CLASSES
    config.data.random_flip = True

    config.process.name = "ddpm"
    config.process.options = process_options("ddpm", beta_start=1e-4, beta_end=0.02, num_steps=1000)
    config.loss.prediction = "eps"
    config.loss.weighting = "constant"
    config.loss.time_sampler = "uniform"

    config.model.name = MODEL
    config.model.class_conditional = True
    config.model.overrides = model_preset_overrides(MODEL)

    config.optim.name = "adamw"
    config.optim.learning_rate = 1e-4
    config.optim.weight_decay = 0.0
    config.optim.warmup_steps = 0
    config.optim.grad_clip = 0.0

    config.train.num_steps = 400_000
    config.train.batch_size = 256
    config.train.ema_decay = 0.9999
    config.train.ema_warmup = False
    config.train.label_dropout = 0.1
    config.train.checkpoint_every = 10_000

    config.sample.solver = "ancestral"
    config.sample.steps = 250
    config.sample.grid = "uniform"
    config.sample.guidance_scale = 1.5
    return config

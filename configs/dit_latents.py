"""DiT on autoencoder latents (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

`get_config()` / `get_config("imagenet")`: DiT-XL/2 on 32x32x4 latents of ImageNet 256x256 through
the Stable Diffusion VAE (Table 4: 675M parameters, 118.6 GMACs). BENCHMARK-ONLY on a CPU: there is
no ImageNet latent cache offline, so `prepare_run` stops at data.path (a file it names) until one is
built (`diffjax.data.latents.build_latent_records`, a directory of array_record shards encoded by
every host, with the SD VAE from `load_pretrained`) and passed with --config.data.path (a directory
or an npz of `build_latent_cache`). The train-step benchmark (experiments/benchmarks/train_step.py) builds it
with synthetic latents of shape LATENT_SHAPE and NUM_CLASSES labels; tests/test_configs.py checks
that it does.

Paper settings: class-conditional on 1000 classes with label dropout 0.1 (classifier-free guidance),
the 1000-step DDPM chain with linear betas 1e-4 .. 0.02 and an eps-prediction (unweighted) loss;
AdamW at a constant lr 1e-4, no weight decay, no warm-up and no gradient clipping, batch 256,
400K steps, EMA 0.9999; random horizontal flips. Samples: 250 DDPM (ancestral) steps with guidance
scale 1.5. Difference: the reference predicts a learned variance too; this model predicts eps only.

`get_config("mnist_tiny")` (`--config=configs/dit_latents.py:mnist_tiny`): the same recipe at CPU
size, trainable end to end: a 4-block DiT (hidden 128, 4 heads, patch 2) on the 8x8x2 latents of
MNIST at 16x16 encoded by the tiny autoencoder of `python -m diffjax.training.autoencoder
--data=mnist --out=workdir/mnist_tiny_autoencoder` (the cache MNIST_TINY_CACHE; its meta names the
autoencoder, which decodes sample grids and the samples of FID), 10 classes, label dropout 0.1,
AdamW at 1e-3 with warm-up and cosine decay, no flips (digits are not mirror-symmetric), 100
ancestral steps with guidance scale 1.5.
"""

from diffjax.training.config import base_config, model_preset_overrides, process_options

BENCHMARK_ONLY = True  # the default (ImageNet) config; the "mnist_tiny" variant trains on a CPU
LATENT_SHAPE = (32, 32, 4)
NUM_CLASSES = 1000
MODEL = "DiT-XL/2"
IMAGENET_CACHE = "imagenet256_sd_vae_latents.npz"  # build it: see the docstring
MNIST_TINY_CACHE = "workdir/mnist_tiny_autoencoder/latents.npz"
VARIANTS = ("imagenet", "mnist_tiny")


def get_config(variant: str = "imagenet"):
    if variant not in VARIANTS:
        raise ValueError(f"configs/dit_latents.py: unknown variant {variant!r}; variants are {VARIANTS}")
    config = base_config()
    config.data.name = "custom"
    config.data.source = "latents"
    config.data.path = IMAGENET_CACHE
    config.data.image_size = LATENT_SHAPE[0]
    config.data.channels = LATENT_SHAPE[2]
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
    return _mnist_tiny(config) if variant == "mnist_tiny" else config


def _mnist_tiny(config):
    config.data.path = MNIST_TINY_CACHE
    config.data.image_size = 8
    config.data.channels = 2
    config.data.num_classes = 10
    config.data.random_flip = False

    config.model.name = "DiT-S/2"
    config.model.overrides = model_preset_overrides("DiT-S/2", hidden_size=128, depth=4, num_heads=4)

    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 200
    config.optim.schedule = "cosine"
    config.optim.min_lr_ratio = 0.1
    config.optim.grad_clip = 1.0

    config.train.num_steps = 4000
    config.train.batch_size = 64
    config.train.ema_decay = 0.999
    config.train.ema_warmup = True
    config.train.log_every = 50
    config.train.checkpoint_every = 1000

    config.sample.steps = 100
    config.sample.num_samples = 64
    config.eval.num_samples = 256
    config.eval.batch_size = 128
    config.eval.loss_batches = 10
    return config

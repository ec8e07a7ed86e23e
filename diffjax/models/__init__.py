"""Network architectures for diffusion models, as Flax NNX modules. They know nothing of diffusion.

Model contract (the rest of diffjax relies on it)
-------------------------------------------------
* Every model is an `nnx.Module` called as

      out = model(x, t, y=None, *, train=False, rngs=None)

  - x: NHWC float array (batch, height, width, channels); DiT also takes images/latents in NHWC and
    patchifies inside.
  - t: (batch,) float, the noise-conditioning value chosen by the caller (e.g. t in [0, 1], or EDM's
    c_noise = log(sigma) / 4). The network embeds `config.time_scale * t`.
  - y: optional (batch,) int class labels in [0, num_classes]; the value `num_classes` is the null
    class (classifier-free guidance), and y=None means the null class for every example.
    Unconditional models (num_classes=0) reject labels.
  - out: float32 array of x's shape (with `learn_sigma=True`, DiT and the U-Nets return 2C channels:
    the prediction, then improved DDPM's variance interpolation v).
  - Dropout only when train=True, with randomness from the call-time `rngs` (an `nnx.Rngs` with a
    "dropout" stream, or a PRNG key). DiT has no dropout.
* `create(name, **overrides)` builds a preset (`preset_names()`): "unet-small", "DDPM++-cifar10",
  "DDPM++-cifar10-deep", "NCSN++-cifar10", "NCSN++-cifar10-deep", "DDPM++-cifar10-edm",
  "NCSN++-cifar10-edm", "ADM-cifar10", "ADM-imagenet64", "DiT-{S,B,L,XL}/{2,4,8}",
  "EDM2-img512-{xxs,xs,s,m,l,xl,xxl}", "EDM2-img64-{xs,s,m,l,xl}" (`EDM2UNet`). Overrides are
  config fields (see `SongUNetConfig`, `ADMUNetConfig`, `DiTConfig`), e.g. image_size, in_channels,
  num_classes, dtype, param_dtype, attention_impl, remat, scan_layers. Unknown names or bad values
  raise ValueError before anything is traced.
* `functional(model) -> (apply, params)`: params is a nested dict of arrays; `apply(params, x, t,
  y=None, *, key=None)` is pure (key=None: no dropout).
* Precision: `param_dtype` for storage, `dtype` for compute (bf16 or f32); normalization
  statistics, softmax and time embeddings in f32; outputs in f32.
* Remat: `remat` in {"none", "full", "dots", "dots_no_batch"} (jax.checkpoint policies) per block.
* Sharding: every parameter carries logical axis names (`LOGICAL_AXES`, NNX `out_sharding`
  metadata); `logical_partition_specs(model)` returns them as PartitionSpecs in the structure of
  `params`. Activations are constrained with the activation names only under a mesh and
  `nnx.logical_axis_rules(...)`.
* Attention always goes through `layers.Attention` -> `diffjax.kernels.flash_attention`.
* Class conditioning: an embedding table with num_classes + 1 rows (null class last);
  `drop_labels(key, y, rate, num_classes)` for classifier-free guidance training.
* Vector (toy) data: `ToyMLP(ToyMLPConfig(data_dim=2), rngs=nnx.Rngs(0))` (or
  `build(ToyMLPConfig(data_dim=2))`) takes x of shape (batch, data_dim) with the same call contract;
  `sinusoidal_embedding(t, dim)` and `gaussian_fourier_embedding(t, freqs)` are the time
  features every model uses.
* Published checkpoints: `load_pretrained(path, **options)` (DiT, guided-diffusion, EDM SongUNet,
  diffusers DiT; see `diffjax.models.pretrained`) returns a `Pretrained` with the process and
  prediction the network was trained with.
* Token sequences and token images (discrete diffusion): `SequenceTransformer(SequenceConfig(...))`
  takes integer states (batch, length) or (batch, height, width) and returns logits x.shape + (vocab,),
  built from the DiT blocks without patching; `causal=True` is the autoregressive baseline.
* FLOPs: `dit_forward_macs(config)` (closed form) and `forward_macs(model)` (counted from the traced
  forward; works on abstract models).
"""

from diffjax.models.api import (
    LOGICAL_AXES,
    PARAM_AXES,
    PRESETS,
    build,
    create,
    dit_forward_macs,
    fast_module_tracing,
    forward_macs,
    functional,
    get_config,
    logical_partition_specs,
    param_count,
    preset_names,
)
from diffjax.models.configs import ADMUNetConfig, DiTConfig, EDM2UNetConfig, ModelConfig, SongUNetConfig, ToyMLPConfig
from diffjax.models.dit import DiT
from diffjax.models.edm2 import EDM2UNet
from diffjax.models.layers import (
    REMAT_CHOICES,
    Attention,
    drop_labels,
    gaussian_fourier_embedding,
    sinusoidal_embedding,
)
from diffjax.models.mlp import ToyMLP
from diffjax.models.pretrained import Pretrained, load_pretrained
from diffjax.models.sequence import SequenceConfig, SequenceTransformer
from diffjax.models.unet import ADMUNet, SongUNet

__all__ = [
    "ADMUNet",
    "ADMUNetConfig",
    "Attention",
    "DiT",
    "DiTConfig",
    "EDM2UNet",
    "EDM2UNetConfig",
    "LOGICAL_AXES",
    "ModelConfig",
    "PARAM_AXES",
    "PRESETS",
    "Pretrained",
    "REMAT_CHOICES",
    "SequenceConfig",
    "SequenceTransformer",
    "SongUNet",
    "SongUNetConfig",
    "ToyMLP",
    "ToyMLPConfig",
    "build",
    "create",
    "dit_forward_macs",
    "drop_labels",
    "fast_module_tracing",
    "forward_macs",
    "functional",
    "gaussian_fourier_embedding",
    "get_config",
    "load_pretrained",
    "logical_partition_specs",
    "param_count",
    "preset_names",
    "sinusoidal_embedding",
]

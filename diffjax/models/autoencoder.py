"""The KL autoencoder of latent diffusion (Rombach et al. 2022; Stable Diffusion's VAE, diffusers'
`AutoencoderKL`), as a Flax NNX model in NHWC with the logical axis names of the other models.

Encoder: conv, `len(block_out_channels)` levels of `layers_per_block` residual blocks (x2
downsampling between levels: pad (0, 1) then a stride-2 3x3 conv), a ResBlock-attention-ResBlock
middle, GroupNorm-SiLU-conv to 2 * latent_channels moments, then a 1x1 `quant_conv`. Decoder: the
mirror image with `layers_per_block + 1` blocks per level and nearest x2 upsampling + conv, after a
1x1 `post_quant_conv`. The posterior is N(mean, exp(logvar)) with logvar clipped to [-30, 20].

`encode_latents(model, x, key=None)` returns the diffusion model's latents, scaling_factor *
(mean, or a posterior sample when a key is given, minus shift_factor); `decode_latents(model, z)`
inverts the scaling and decodes. Both run over the batch in chunks of `chunk_size` (lax.map) so
large batches fit.

`save_autoencoder(model, path)` writes the config and parameters to one .npz (atomically);
`load_autoencoder(path)` reads it back. `TINY_AUTOENCODER` is a CPU-sized config for small grayscale
images (one x2 downsampling, 2 latent channels: 8x8x2 latents of 16x16 digits).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import traversals

from diffjax.io import atomic_write
from diffjax.models import layers as L
from diffjax.models.configs import DTYPES, _fail, _positive

__all__ = [
    "AutoencoderConfig",
    "AutoencoderKL",
    "TINY_AUTOENCODER",
    "encode_latents",
    "decode_latents",
    "save_autoencoder",
    "load_autoencoder",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoencoderConfig:
    """Fields as diffusers' AutoencoderKL config: in_channels, latent_channels, block_out_channels
    (one per level), layers_per_block, norm_groups (norm_num_groups), scaling_factor and
    shift_factor (latents = scaling_factor * (z - shift_factor); SD 1.x/2.x: 0.18215 and 0), plus
    dtype / param_dtype as the other models."""

    in_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"

    def validate(self) -> "AutoencoderConfig":
        cls = type(self)
        for field in ("in_channels", "latent_channels", "layers_per_block", "norm_groups"):
            _positive(cls, field, getattr(self, field))
        chans = self.block_out_channels
        if not chans or any(not isinstance(c, int) or c < 1 or c % self.norm_groups for c in chans):
            _fail(
                cls,
                "block_out_channels",
                chans,
                f"a non-empty tuple of positive multiples of norm_groups {self.norm_groups}",
            )
        if not isinstance(self.scaling_factor, (int, float)) or not self.scaling_factor > 0:
            _fail(cls, "scaling_factor", self.scaling_factor, "a positive number")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                _fail(cls, name, getattr(self, name), f"one of {DTYPES}")
        return self

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class VAEResBlock(nnx.Module):
    """GN-SiLU-conv3x3 twice with a residual (1x1 conv when the channels change); no time input."""

    def __init__(self, cfg: AutoencoderConfig, cin: int, cout: int, *, rngs: nnx.Rngs):
        dt = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        init = L.torch_default_init()
        self.norm0 = L.GroupNorm(cin, cfg.norm_groups, eps=1e-6, **dt)
        self.conv0 = L.Conv2d(cin, cout, 3, kernel_init=init, **dt)
        self.norm1 = L.GroupNorm(cout, cfg.norm_groups, eps=1e-6, **dt)
        self.conv1 = L.Conv2d(cout, cout, 3, kernel_init=init, **dt)
        self.skip = L.Conv2d(cin, cout, 1, kernel_init=init, **dt) if cin != cout else None

    def __call__(self, x):
        h = self.conv0(jax.nn.silu(self.norm0(x)))
        h = self.conv1(jax.nn.silu(self.norm1(h)))
        skip = self.skip(x) if self.skip is not None else x
        return L.constrain(skip.astype(h.dtype) + h, ("batch", None, None, "act_channels"))


class VAEAttention(nnx.Module):
    """Single-head self-attention over the pixels with GroupNorm and a residual (the middle block)."""

    def __init__(self, cfg: AutoencoderConfig, ch: int, *, rngs: nnx.Rngs):
        dt = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.norm = L.GroupNorm(ch, cfg.norm_groups, eps=1e-6, **dt)
        self.attn = L.Attention(
            ch,
            1,
            qkv_init=L.torch_default_init(in_axis=0, out_axis=(1, 2, 3)),
            out_init=L.torch_default_init(in_axis=(0, 1), out_axis=2),
            **dt,
        )

    def __call__(self, x):
        b, h, w, c = x.shape
        out = self.attn(self.norm(x).reshape(b, h * w, c)).reshape(b, h, w, c)
        return x.astype(out.dtype) + out


class _Middle(nnx.Module):
    def __init__(self, cfg, ch, *, rngs):
        self.block0 = VAEResBlock(cfg, ch, ch, rngs=rngs)
        self.attn = VAEAttention(cfg, ch, rngs=rngs)
        self.block1 = VAEResBlock(cfg, ch, ch, rngs=rngs)

    def __call__(self, x):
        return self.block1(self.attn(self.block0(x)))


def _resample(cfg, ch, up, rngs):
    return L.Resample(
        ch,
        ch,
        up=up,
        with_conv=True,
        down_pad=(0, 1),
        kernel_init=L.torch_default_init(),
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        rngs=rngs,
    )


def _level_blocks(cfg, chans, blocks_per_level: int, up: bool, rngs) -> tuple[dict, int]:
    """level{i}_block{j} residual blocks to chans[i] channels, and a resampler level{i}_up (up) or
    level{i}_down after every level but the last; returns them and the last level's channels."""
    blocks: dict = {}
    ch = chans[0]
    for i, cout in enumerate(chans):
        for j in range(blocks_per_level):
            blocks[f"level{i}_block{j}"] = VAEResBlock(cfg, ch, cout, rngs=rngs)
            ch = cout
        if i != len(chans) - 1:
            blocks[f"level{i}_{'up' if up else 'down'}"] = _resample(cfg, ch, up, rngs)
    return blocks, ch


class Encoder(nnx.Module):
    def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
        dt = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        chans, init = cfg.block_out_channels, L.torch_default_init()
        self.conv_in = L.Conv2d(cfg.in_channels, chans[0], 3, kernel_init=init, **dt)
        blocks, ch = _level_blocks(cfg, chans, cfg.layers_per_block, False, rngs)
        self.blocks = nnx.Dict(blocks)
        self.order = tuple(blocks)
        self.mid = _Middle(cfg, ch, rngs=rngs)
        self.norm_out = L.GroupNorm(ch, cfg.norm_groups, eps=1e-6, **dt)
        self.conv_out = L.Conv2d(ch, 2 * cfg.latent_channels, 3, kernel_init=init, **dt)
        self.quant_conv = L.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1, kernel_init=init, **dt)

    def __call__(self, x):
        h = self.conv_in(x)
        for name in self.order:
            h = self.blocks[name](h)
        h = self.conv_out(jax.nn.silu(self.norm_out(self.mid(h))))
        return self.quant_conv(h)


class Decoder(nnx.Module):
    def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
        dt = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        chans, init = tuple(reversed(cfg.block_out_channels)), L.torch_default_init()
        z = cfg.latent_channels
        self.post_quant_conv = L.Conv2d(z, z, 1, kernel_init=init, **dt)
        self.conv_in = L.Conv2d(z, chans[0], 3, kernel_init=init, **dt)
        self.mid = _Middle(cfg, chans[0], rngs=rngs)
        blocks, ch = _level_blocks(cfg, chans, cfg.layers_per_block + 1, True, rngs)
        self.blocks = nnx.Dict(blocks)
        self.order = tuple(blocks)
        self.norm_out = L.GroupNorm(ch, cfg.norm_groups, eps=1e-6, **dt)
        self.conv_out = L.Conv2d(ch, cfg.in_channels, 3, kernel_init=init, **dt)

    def __call__(self, z):
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for name in self.order:
            h = self.blocks[name](h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class AutoencoderKL(nnx.Module):
    """`encode(x) -> (mean, logvar)` of the latent posterior, `decode(z) -> x` (NHWC, float32 out);
    calling it reconstructs x from the posterior mean."""

    def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)

    def encode(self, x):
        cfg = self.cfg
        L.check_image(x, x.shape[1:3], cfg.in_channels, "AutoencoderKL.encode")
        if x.shape[1] % cfg.downsampling or x.shape[2] % cfg.downsampling:
            raise ValueError(f"AutoencoderKL needs height and width divisible by {cfg.downsampling}, got {x.shape}")
        moments = self.encoder(x.astype(jnp.dtype(cfg.dtype))).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        L.check_image(z, z.shape[1:3], self.cfg.latent_channels, "AutoencoderKL.decode")
        return self.decoder(z.astype(jnp.dtype(self.cfg.dtype))).astype(jnp.float32)

    def __call__(self, x):
        return self.decode(self.encode(x)[0])


def _chunked(fn, x, chunk_size):
    if chunk_size is None or x.shape[0] <= chunk_size:
        return fn(x)
    return jax.lax.map(lambda xi: jax.tree.map(lambda a: a[0], fn(xi[None])), x, batch_size=chunk_size)


def encode_latents(model: AutoencoderKL, x, key=None, *, chunk_size: int | None = None):
    """scaling_factor * (z - shift_factor) for images x in [-1, 1] (NHWC), z the posterior mean or,
    with a key, a posterior sample (one draw per example); chunk_size examples at a time."""
    cfg = model.cfg

    def one(xb):
        return model.encode(xb)

    mean, logvar = _chunked(one, x, chunk_size)
    z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return cfg.scaling_factor * (z - cfg.shift_factor)


def decode_latents(model: AutoencoderKL, latents, *, chunk_size: int | None = None):
    """Images in [-1, 1] (not clipped) from diffusion latents: decode(latents / scaling + shift)."""
    cfg = model.cfg
    z = latents / cfg.scaling_factor + cfg.shift_factor
    return _chunked(model.decode, z, chunk_size)


# A CPU-sized autoencoder for small grayscale images, e.g. 16x16 digits -> 8x8x2 latents (scaling_factor
# is set from the data after training, see diffjax.training.autoencoder).
TINY_AUTOENCODER = AutoencoderConfig(
    in_channels=1, latent_channels=2, block_out_channels=(16, 32), layers_per_block=1, norm_groups=8, scaling_factor=1.0
)

_CONFIG_KEY = "autoencoder_config"


def save_autoencoder(model: AutoencoderKL, path: str | os.PathLike) -> str:
    """Write `model`'s config (JSON) and parameters (float32, keyed by their '/'-joined path) to the
    .npz `path`, atomically; returns the path."""
    flat = traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    arrays = {"/".join(map(str, k)): np.asarray(v, np.float32) for k, v in flat.items()}
    config = json.dumps(dataclasses.asdict(model.cfg))
    arrays[_CONFIG_KEY] = np.frombuffer(config.encode(), np.uint8)

    def write(f):
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        f.write(buffer.getvalue())

    return atomic_write(path, write)


def load_autoencoder(path: str | os.PathLike) -> AutoencoderKL:
    """The AutoencoderKL saved by `save_autoencoder` at `path` (config and parameters checked)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"autoencoder file {path!r} does not exist (write one with save_autoencoder)")
    with np.load(path) as z:
        if _CONFIG_KEY not in z.files:
            raise ValueError(f"{path!r} is not an autoencoder saved by save_autoencoder (no {_CONFIG_KEY!r})")
        fields = json.loads(z[_CONFIG_KEY].tobytes().decode())
        arrays = {k: z[k] for k in z.files if k != _CONFIG_KEY}
    fields["block_out_channels"] = tuple(fields["block_out_channels"])
    cfg = AutoencoderConfig(**fields).validate()
    model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    abstract = nnx.state(model, nnx.Param)
    want = traversals.flatten_mapping(nnx.to_pure_dict(abstract))
    names = {"/".join(map(str, k)): k for k in want}
    if set(names) != set(arrays):
        missing, extra = sorted(set(names) - set(arrays)), sorted(set(arrays) - set(names))
        raise ValueError(f"{path!r}: parameters missing {missing[:5]}, unexpected {extra[:5]} for its config")
    typed = {}
    for name, key in names.items():
        if arrays[name].shape != tuple(want[key].shape):
            raise ValueError(f"{path!r}: parameter {name} has shape {arrays[name].shape}, expected {want[key].shape}")
        typed[key] = jnp.asarray(arrays[name], want[key].dtype)
    nnx.replace_by_pure_dict(abstract, traversals.unflatten_mapping(typed))
    nnx.update(model, abstract)
    return model

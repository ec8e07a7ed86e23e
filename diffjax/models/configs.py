"""Model configurations (frozen dataclasses) and their validation.

A configuration is plain data: it can be built from an ml_collections dict, compared and hashed, and
it is validated (with errors naming the bad field and what is allowed) before any model is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from diffjax.kernels import IMPLEMENTATIONS, PALLAS_IMPLEMENTATIONS
from diffjax.models.layers import REMAT_CHOICES

DTYPES = ("float32", "bfloat16")  # what the attention kernels support


def _fail(cls, field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{cls.__name__}.{field}={value!r} is invalid: {allowed}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Fields shared by every model.

    image_size: int or (height, width) of the NHWC input (for DiT: the latent's spatial size).
    in_channels: channels of the input, and of the output (the output has the input's shape).
    num_classes: 0 for unconditional models; otherwise labels are 0..num_classes-1 and the value
      num_classes is the null class (classifier-free guidance, and y=None).
    time_scale: the network embeds time_scale * t, where t is the noise-conditioning value the caller
      passes (e.g. t in [0, 1] with time_scale 1000 for positional embeddings, or log(sigma) with
      time_scale 1 for Gaussian Fourier features).
    dtype / param_dtype: compute and storage precision ("float32" or "bfloat16"); outputs are
      always float32.
    attention_impl: passed to `diffjax.kernels.flash_attention(implementation=...)`; None lets the
      kernels pick the best for the platform.
    attention_interpret: run the Pallas kernel of attention_impl ("pallas_gpu" or "pallas_tpu") in
      interpret mode, e.g. to train through the kernels on a CPU (slow: for tests and debugging).
    remat: rematerialization of each residual/transformer block: "none", "full" (save nothing),
      "dots" (save matmul outputs), "dots_no_batch" (save matmuls without batch dims).
    learn_sigma: output 2 * in_channels channels, the prediction followed by the variance
      interpolation v of improved DDPM (Nichol & Dhariwal 2021), as DiT's and ADM's code name it.
    """

    image_size: int | tuple[int, int]
    in_channels: int
    num_classes: int = 0
    time_scale: float = 1000.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str | None = None
    attention_interpret: bool = False
    remat: str = "none"
    learn_sigma: bool = False

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def hw(self) -> tuple[int, int]:
        s = self.image_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self):
        return jnp.dtype(self.param_dtype)

    def validate(self) -> "ModelConfig":
        cls = type(self)
        s = self.image_size
        if not (isinstance(s, int) or (isinstance(s, tuple) and len(s) == 2)):
            _fail(cls, "image_size", s, "an int or a (height, width) tuple")
        if min(self.hw) < 1:
            _fail(cls, "image_size", s, "sizes must be positive")
        _positive(cls, "in_channels", self.in_channels)
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            _fail(cls, "num_classes", self.num_classes, "a non-negative int (0 = unconditional)")
        if not isinstance(self.time_scale, (int, float)) or self.time_scale <= 0:
            _fail(cls, "time_scale", self.time_scale, "a positive number")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                _fail(cls, name, getattr(self, name), f"one of {DTYPES}")
        if self.attention_impl is not None and self.attention_impl not in IMPLEMENTATIONS:
            _fail(
                cls, "attention_impl", self.attention_impl, f"None (best for the platform) or one of {IMPLEMENTATIONS}"
            )
        if not isinstance(self.attention_interpret, bool) or (
            self.attention_interpret and self.attention_impl not in PALLAS_IMPLEMENTATIONS
        ):
            _fail(
                cls,
                "attention_interpret",
                self.attention_interpret,
                f"False, or True with attention_impl in {PALLAS_IMPLEMENTATIONS} (it is {self.attention_impl!r})",
            )
        if self.remat not in REMAT_CHOICES:
            _fail(cls, "remat", self.remat, f"one of {REMAT_CHOICES}")
        if not isinstance(self.learn_sigma, bool):
            _fail(cls, "learn_sigma", self.learn_sigma, "True or False")
        return self


def _positive(cls, field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(cls, field, value, "a positive int")


def _check_unet_levels(cfg, mult_field: str, attn_field: str) -> None:
    cls = type(cfg)
    mult = getattr(cfg, mult_field)
    if not mult or any(not isinstance(m, int) or m < 1 for m in mult):
        _fail(cls, mult_field, mult, "a non-empty tuple of positive ints")
    factor = 2 ** (len(mult) - 1)
    h, w = cfg.hw
    if h % factor or w % factor:
        _fail(
            cls,
            "image_size",
            cfg.image_size,
            f"must be divisible by 2^(levels-1) = {factor} for the {len(mult)} resolution levels of {mult_field}",
        )
    levels = tuple(h // 2**i for i in range(len(mult)))
    bad = [r for r in getattr(cfg, attn_field) if r not in levels]
    if bad:
        _fail(
            cls,
            attn_field,
            getattr(cfg, attn_field),
            f"each entry must be a level resolution {levels} (image_size {cfg.image_size}, {mult_field} {mult})",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SongUNetConfig(ModelConfig):
    """DDPM++ / NCSN++ U-Net of Song et al. 2021, "Score-Based Generative Modeling through SDEs".

    Field names follow score_sde's configs: nf base channels, ch_mult per level, num_res_blocks per
    level, attn_resolutions (absolute, in pixels), resblock_type "biggan" | "ddpm", fir (FIR
    resampling with fir_kernel), skip_rescale (divide residual sums by sqrt 2), progressive
    ("none" | "output_skip" | "residual"), progressive_input ("none" | "input_skip" | "residual"),
    progressive_combine ("sum" | "cat"), embedding_type ("positional" | "fourier"), fourier_scale,
    init_scale (scale of the last conv of each block; 0 = zero init), class_embedding (how labels
    enter: "table", a (num_classes + 1)-row table added after the time MLP as in ADM; "linear", EDM's
    `map_label`, a biased Linear of sqrt(num_classes) * one_hot(y) added to the noise features before
    the time MLP, the null class being the zero vector).
    """

    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resblock_type: str = "biggan"
    resamp_with_conv: bool = True
    fir: bool = False
    fir_kernel: tuple[float, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    progressive: str = "none"
    progressive_input: str = "none"
    progressive_combine: str = "sum"
    embedding_type: str = "positional"
    fourier_scale: float = 16.0
    init_scale: float = 0.0
    class_embedding: str = "table"

    def validate(self):
        super().validate()
        cls = type(self)
        _positive(cls, "nf", self.nf)
        _positive(cls, "num_res_blocks", self.num_res_blocks)
        _check_unet_levels(self, "ch_mult", "attn_resolutions")
        if self.nf % 4:
            _fail(cls, "nf", self.nf, "must be divisible by 4 (GroupNorm uses min(C // 4, 32) groups)")
        if not 0.0 <= self.dropout < 1.0:
            _fail(cls, "dropout", self.dropout, "a rate in [0, 1)")
        choices = dict(
            resblock_type=("biggan", "ddpm"),
            progressive=("none", "output_skip", "residual"),
            progressive_input=("none", "input_skip", "residual"),
            progressive_combine=("sum", "cat"),
            embedding_type=("positional", "fourier"),
            class_embedding=("table", "linear"),
        )
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                _fail(cls, field, getattr(self, field), f"one of {allowed}")
        if self.embedding_type == "fourier" and self.fourier_scale <= 0:
            _fail(cls, "fourier_scale", self.fourier_scale, "a positive number")
        if len(self.fir_kernel) < 2:
            _fail(cls, "fir_kernel", self.fir_kernel, "a 1-D filter with at least 2 taps")
        return self


@dataclasses.dataclass(frozen=True, kw_only=True)
class ADMUNetConfig(ModelConfig):
    """U-Net of improved DDPM / ADM (Nichol & Dhariwal 2021; Dhariwal & Nichol 2021, "Diffusion Models
    Beat GANs"). model_channels base width, channel_mult per level, num_res_blocks per level,
    attn_resolutions (absolute, in pixels), heads = channels // num_head_channels (or num_heads when
    num_head_channels is -1), resblock_updown (resample inside residual blocks), use_scale_shift_norm
    (AdaGN), conv_resample (3x3 conv in the plain resamplers), norm_groups (GroupNorm groups; with
    min_group_channels > 0 a norm over C channels has min(norm_groups, C // min_group_channels), as
    in EDM's DhariwalUNet). DDPM's U-Net as diffusers' UNet2DModel writes it differs only in
    norm_eps (1e-6 there), downsample_pad ((0, 1) there: the stride-2 conv pads right/bottom) and
    frequency_shift (1 there: time frequencies 10000^(-k / (half - 1)) instead of half).
    """

    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (32, 16, 8)
    num_heads: int = 4
    num_head_channels: int = 64
    dropout: float = 0.1
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    conv_resample: bool = True
    norm_groups: int = 32
    min_group_channels: int = 0
    norm_eps: float = 1e-5
    downsample_pad: tuple[int, int] = (1, 1)
    frequency_shift: int = 0

    def groups(self, channels: int) -> int:
        """GroupNorm groups for `channels` channels."""
        if self.min_group_channels > 0:
            return max(1, min(self.norm_groups, channels // self.min_group_channels))
        return self.norm_groups

    def validate(self):
        super().validate()
        cls = type(self)
        _positive(cls, "model_channels", self.model_channels)
        _positive(cls, "num_res_blocks", self.num_res_blocks)
        _positive(cls, "norm_groups", self.norm_groups)
        if self.min_group_channels < 0:
            _fail(cls, "min_group_channels", self.min_group_channels, "0 (norm_groups everywhere) or positive")
        if not self.norm_eps > 0:
            _fail(cls, "norm_eps", self.norm_eps, "a positive number")
        if tuple(self.downsample_pad) not in ((1, 1), (0, 1)):
            _fail(cls, "downsample_pad", self.downsample_pad, "(1, 1) (ADM) or (0, 1) (DDPM, diffusers)")
        if self.frequency_shift not in (0, 1):
            _fail(cls, "frequency_shift", self.frequency_shift, "0 (ADM) or 1 (DDPM, diffusers)")
        _check_unet_levels(self, "channel_mult", "attn_resolutions")
        if not 0.0 <= self.dropout < 1.0:
            _fail(cls, "dropout", self.dropout, "a rate in [0, 1)")
        for m in self.channel_mult:
            c = m * self.model_channels
            level = f"channels (channel_mult entry {m} x model_channels {self.model_channels} = {c})"
            if c % self.groups(c):
                _fail(cls, "norm_groups", self.norm_groups, f"must divide every level's {level}")
            if self.num_head_channels != -1:
                if self.num_head_channels < 1 or c % self.num_head_channels:
                    _fail(
                        cls,
                        "num_head_channels",
                        self.num_head_channels,
                        f"-1 or a positive divisor of every level's {level}",
                    )
            elif self.num_heads < 1 or c % self.num_heads:
                _fail(cls, "num_heads", self.num_heads, f"a positive divisor of every level's {level}")
        return self


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiTConfig(ModelConfig):
    """Diffusion Transformer of Peebles & Xie 2023, "Scalable Diffusion Models with Transformers".

    patch_size p, hidden_size D, depth (number of adaLN-Zero blocks), num_heads, mlp_ratio,
    frequency_embedding_size (sinusoidal features of t before the time MLP), scan_layers (stack the
    blocks and run them with a scan: compile time flat in depth; False unrolls the same parameters).
    frequency_shift and mlp_norm_eps are 0 and 1e-6 in the original DiT; diffusers'
    DiTTransformer2DModel uses time frequencies 10000^(-k / (half - 1)) (frequency_shift 1) and eps
    1e-5 in the LayerNorm before each block's MLP (its norm3).
    """

    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    frequency_embedding_size: int = 256
    scan_layers: bool = True
    frequency_shift: int = 0
    mlp_norm_eps: float = 1e-6

    def validate(self):
        super().validate()
        cls = type(self)
        for field in ("patch_size", "hidden_size", "depth", "num_heads", "frequency_embedding_size"):
            _positive(cls, field, getattr(self, field))
        h, w = self.hw
        if h % self.patch_size or w % self.patch_size:
            _fail(cls, "image_size", self.image_size, f"must be divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            _fail(cls, "num_heads", self.num_heads, f"must divide hidden_size {self.hidden_size}")
        if self.hidden_size % 4:
            _fail(cls, "hidden_size", self.hidden_size, "must be divisible by 4 (2-D sin-cos positions)")
        if not self.mlp_ratio > 0 or int(self.hidden_size * self.mlp_ratio) < 1:
            _fail(cls, "mlp_ratio", self.mlp_ratio, "a positive number")
        if self.frequency_shift not in (0, 1):
            _fail(cls, "frequency_shift", self.frequency_shift, "0 (original DiT) or 1 (diffusers)")
        if not isinstance(self.mlp_norm_eps, (int, float)) or not self.mlp_norm_eps > 0:
            _fail(cls, "mlp_norm_eps", self.mlp_norm_eps, "a positive number")
        return self

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def num_tokens(self) -> int:
        h, w = self.hw
        return (h // self.patch_size) * (w // self.patch_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EDM2UNetConfig(ModelConfig):
    """The magnitude-preserving U-Net of EDM2 (Karras et al. 2024, "Analyzing and Improving the Training
    Dynamics of Diffusion Models", config G). model_channels base width, channel_mult per level,
    channel_mult_noise / channel_mult_emb (0 = the first level's / the widest level's multiplier),
    num_blocks per level, attn_resolutions (absolute, in pixels of the height), channels_per_head,
    label_balance / concat_balance / res_balance / attn_balance (the t of the MP sums and
    concatenations), clip_act (0 = no clipping), logvar_channels (Fourier features of the
    uncertainty head). Fed EDM's c_noise = log(sigma) / 4 (time_scale 1); no learned sigma.
    """

    time_scale: float = 1.0
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    channel_mult_noise: int = 0
    channel_mult_emb: int = 0
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (16, 8)
    channels_per_head: int = 64
    dropout: float = 0.0
    label_balance: float = 0.5
    concat_balance: float = 0.5
    res_balance: float = 0.3
    attn_balance: float = 0.3
    clip_act: float = 256.0
    logvar_channels: int = 128

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def noise_channels(self) -> int:
        return self.model_channels * self.channel_mult_noise if self.channel_mult_noise else self.level_channels[0]

    @property
    def emb_channels(self) -> int:
        return self.model_channels * self.channel_mult_emb if self.channel_mult_emb else max(self.level_channels)

    def validate(self):
        super().validate()
        cls = type(self)
        for name in ("model_channels", "num_blocks", "channels_per_head", "logvar_channels"):
            _positive(cls, name, getattr(self, name))
        for name in ("channel_mult_noise", "channel_mult_emb"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _fail(cls, name, value, "an int >= 0 (0 = chosen from channel_mult)")
        _check_unet_levels(self, "channel_mult", "attn_resolutions")
        if self.learn_sigma:
            _fail(cls, "learn_sigma", self.learn_sigma, "False (EDM2 predicts a log-variance per noise level instead)")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            _fail(cls, "dropout", self.dropout, "a rate in [0, 1)")
        for name in ("label_balance", "concat_balance", "res_balance", "attn_balance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                _fail(cls, name, value, "a number in [0, 1]")
        if not isinstance(self.clip_act, (int, float)) or isinstance(self.clip_act, bool) or self.clip_act < 0:
            _fail(cls, "clip_act", self.clip_act, "a number >= 0 (0 = no clipping)")
        last = len(self.channel_mult) - 1
        for i, c in enumerate(self.level_channels):
            if (self.hw[0] // 2**i in self.attn_resolutions or i == last) and c % self.channels_per_head:
                _fail(
                    cls,
                    "channels_per_head",
                    self.channels_per_head,
                    f"must divide every attention level's channels ({c} = channel_mult entry x model_channels "
                    f"{self.model_channels})",
                )
        return self


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyMLPConfig:
    """A residual MLP for vector data of shape (batch, data_dim) (toy distributions, tabular data).

    width: hidden width of every layer; depth: number of residual blocks; embedding_dim: size of the
    sinusoidal features of time_scale * t; num_classes and time_scale as in `ModelConfig`. Computes in
    float32; no dropout.
    """

    data_dim: int
    width: int = 128
    depth: int = 3
    embedding_dim: int = 64
    num_classes: int = 0
    time_scale: float = 1000.0

    def validate(self) -> "ToyMLPConfig":
        cls = type(self)
        for field in ("data_dim", "width", "depth", "embedding_dim"):
            _positive(cls, field, getattr(self, field))
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            _fail(cls, "num_classes", self.num_classes, "a non-negative int (0 = unconditional)")
        if not isinstance(self.time_scale, (int, float)) or self.time_scale <= 0:
            _fail(cls, "time_scale", self.time_scale, "a positive number")
        return self

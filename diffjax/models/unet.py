"""Convolutional U-Nets for diffusion: DDPM++ / NCSN++ (score-SDE) and the improved-DDPM / ADM U-Net.

Both are called as `model(x, t, y=None, *, train=False, rngs=None)` with x NHWC, t (batch,) and
return a float32 array of x's shape. Neither knows anything about diffusion: output scaling such as
NCSN++'s division by sigma or EDM preconditioning belongs to `diffjax.denoisers`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from diffjax.models import layers as L
from diffjax.models.configs import ADMUNetConfig, SongUNetConfig


def _channels_constraint(h):
    return L.constrain(h, ("batch", None, None, "act_channels"))


# ----------------------------------------------------------------------------------------------
# DDPM++ / NCSN++ (Song et al. 2021)
# ----------------------------------------------------------------------------------------------


class SongResBlock(nnx.Module):
    """Residual block of DDPM++ / NCSN++: "ddpm" (Ho et al. 2020) or "biggan" (Brock et al. 2019,
    resampling inside the block); the time embedding enters as a per-channel bias; the sum with the
    shortcut is divided by sqrt(2) when skip_rescale."""

    def __init__(
        self,
        cfg: SongUNetConfig,
        in_ch: int,
        out_ch: int,
        temb_dim: int,
        *,
        up: bool = False,
        down: bool = False,
        rngs: nnx.Rngs,
    ):
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
        self.biggan = cfg.resblock_type == "biggan"
        self.up, self.down = up, down
        self.fir, self.fir_kernel = cfg.fir, tuple(cfg.fir_kernel)
        self.dropout, self.skip_rescale = cfg.dropout, cfg.skip_rescale
        self.norm0 = L.GroupNorm(in_ch, min(in_ch // 4, 32), eps=1e-6, **dt)
        self.conv0 = L.Conv2d(in_ch, out_ch, 3, kernel_init=L.scaled_fan_avg_uniform(), **dt)
        self.temb = L.Dense(temb_dim, out_ch, names=("embed", "conv_out"), kernel_init=L.scaled_fan_avg_uniform(), **dt)
        self.norm1 = L.GroupNorm(out_ch, min(out_ch // 4, 32), eps=1e-6, **dt)
        self.conv1 = L.Conv2d(out_ch, out_ch, 3, kernel_init=L.scaled_fan_avg_uniform(cfg.init_scale), **dt)
        needs_skip = in_ch != out_ch or up or down
        # BigGAN blocks project with a 1x1 conv; DDPM blocks with a NIN (also 1x1) of init scale 0.1.
        self.skip = (
            L.Conv2d(in_ch, out_ch, 1, kernel_init=L.scaled_fan_avg_uniform(1.0 if self.biggan else 0.1), **dt)
            if needs_skip
            else None
        )

    def _resample(self, x):
        if self.up:
            return L.fir_upsample(x, self.fir_kernel) if self.fir else L.upsample_nearest(x)
        if self.down:
            return L.fir_downsample(x, self.fir_kernel) if self.fir else L.downsample_mean(x)
        return x

    def __call__(self, x, temb, dropout_key):
        h = jax.nn.silu(self.norm0(x))
        if self.up or self.down:
            h, x = self._resample(h), self._resample(x)
        h = self.conv0(h)
        h = h + self.temb(jax.nn.silu(temb))[:, None, None, :]
        h = jax.nn.silu(self.norm1(h))
        h = self.conv1(L.dropout(h, self.dropout, dropout_key))
        if self.skip is not None:
            x = self.skip(x)
        out = x.astype(h.dtype) + h
        return _channels_constraint(out / math.sqrt(2.0) if self.skip_rescale else out)


class AttnBlock(nnx.Module):
    """Self-attention over the pixels of a feature map with a residual connection (DDPM's block;
    ADM's with several heads). Output projection zero-initialised."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        *,
        groups: int,
        eps: float,
        skip_rescale: bool,
        qkv_init,
        cfg,
        rngs: nnx.Rngs,
    ):
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
        self.skip_rescale = skip_rescale
        self.norm = L.GroupNorm(channels, groups, eps=eps, **dt)
        self.attn = L.Attention(
            channels,
            num_heads,
            qkv_init=qkv_init,
            out_init=L.zeros_init,
            attention_impl=cfg.attention_impl,
            attention_interpret=cfg.attention_interpret,
            **dt,
        )

    def __call__(self, x):
        b, h, w, c = x.shape
        tokens = self.norm(x).reshape(b, h * w, c)
        out = x.astype(self.attn.out.dtype) + self.attn(tokens).reshape(b, h, w, c)
        return out / math.sqrt(2.0) if self.skip_rescale else out


def _song_attention(cfg: SongUNetConfig, channels: int, rngs) -> AttnBlock:
    # score-SDE's AttnBlockpp: a single head over all channels, NIN projections with default init.
    return AttnBlock(
        channels,
        1,
        groups=min(channels // 4, 32),
        eps=1e-6,
        skip_rescale=cfg.skip_rescale,
        qkv_init=L.scaled_fan_avg_uniform(in_axis=0, out_axis=(1, 2, 3)),
        cfg=cfg,
        rngs=rngs,
    )


class SongUNet(nnx.Module):
    """DDPM++ and NCSN++ U-Nets (Song et al. 2021, "Score-Based Generative Modeling through SDEs"),
    with the class embedding (plus a null class) added to the time embedding as in ADM
    (class_embedding "table") or EDM's map_label before the time MLP (class_embedding "linear").

    Structure follows score_sde's `NCSNpp`: a conv stem, `num_res_blocks` residual blocks per level
    (attention after each block at `attn_resolutions`), resampling blocks between levels, optional
    progressive input/output pyramids, a ResBlock-Attention-ResBlock middle, and a decoder with
    `num_res_blocks + 1` blocks per level taking the encoder's skips.
    """

    def __init__(self, cfg: SongUNetConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
        nf, nlev = cfg.nf, len(cfg.ch_mult)
        self.resolutions = tuple(cfg.hw[0] // 2**i for i in range(nlev))
        temb_dim = 4 * nf
        emb_in = 2 * nf if cfg.embedding_type == "fourier" else nf
        self.temb0 = L.Dense(emb_in, temb_dim, names=(None, "mlp"), kernel_init=L.scaled_fan_avg_uniform(), **dt)
        self.temb1 = L.Dense(temb_dim, temb_dim, names=("mlp", "embed"), kernel_init=L.scaled_fan_avg_uniform(), **dt)
        self.fourier = (
            L.FourierFeatures(nf, scale=cfg.fourier_scale, rngs=rngs) if cfg.embedding_type == "fourier" else None
        )
        self.class_embed = (
            L.ClassEmbedding(cfg.num_classes, temb_dim, **dt)
            if cfg.num_classes and cfg.class_embedding == "table"
            else None
        )
        # EDM's map_label: a biased Linear of sqrt(num_classes) * one_hot(y) added to the noise features
        # before the time MLP; the null class is the zero vector (so it maps to the bias alone).
        self.map_label = (
            L.Dense(cfg.num_classes, emb_in, names=("classes", None), kernel_init=L.scaled_fan_avg_uniform(), **dt)
            if cfg.num_classes and cfg.class_embedding == "linear"
            else None
        )

        def block(cin, cout, **kw):
            return SongResBlock(cfg, cin, cout, temb_dim, rngs=rngs, **kw)

        def resample(cin, cout, up, with_conv):
            return L.Resample(
                cin,
                cout,
                up=up,
                with_conv=with_conv,
                fir_kernel=cfg.fir_kernel if cfg.fir else None,
                kernel_init=L.scaled_fan_avg_uniform(),
                **dt,
            )

        conv_init = L.scaled_fan_avg_uniform()
        self.conv_in = L.Conv2d(cfg.in_channels, nf, 3, kernel_init=conv_init, **dt)
        down: dict[str, nnx.Module] = {}
        skip_channels, ch, pyramid_ch = [nf], nf, cfg.in_channels
        for i in range(nlev):
            for j in range(cfg.num_res_blocks):
                down[f"level{i}_block{j}"] = block(ch, nf * cfg.ch_mult[i])
                ch = nf * cfg.ch_mult[i]
                if self.resolutions[i] in cfg.attn_resolutions:
                    down[f"level{i}_attn{j}"] = _song_attention(cfg, ch, rngs)
                skip_channels.append(ch)
            if i == nlev - 1:
                continue
            if cfg.resblock_type == "ddpm":
                down[f"level{i}_down"] = resample(ch, ch, up=False, with_conv=cfg.resamp_with_conv)
            else:
                down[f"level{i}_down"] = block(ch, ch, down=True)
            if cfg.progressive_input == "input_skip":
                down[f"level{i}_combine"] = L.Conv2d(pyramid_ch, ch, 1, kernel_init=conv_init, **dt)
                if cfg.progressive_combine == "cat":
                    ch *= 2
            elif cfg.progressive_input == "residual":
                down[f"level{i}_pyramid"] = resample(pyramid_ch, ch, up=False, with_conv=True)
                pyramid_ch = ch
            skip_channels.append(ch)
        self.down = nnx.Dict(down)

        self.mid_block0 = block(ch, ch)
        self.mid_attn = _song_attention(cfg, ch, rngs)
        self.mid_block1 = block(ch, ch)

        up: dict[str, nnx.Module] = {}
        out_init = L.scaled_fan_avg_uniform(cfg.init_scale)
        pyramid_ch = 0
        for i in reversed(range(nlev)):
            for j in range(cfg.num_res_blocks + 1):
                up[f"level{i}_block{j}"] = block(ch + skip_channels.pop(), nf * cfg.ch_mult[i])
                ch = nf * cfg.ch_mult[i]
            if self.resolutions[i] in cfg.attn_resolutions:
                up[f"level{i}_attn"] = _song_attention(cfg, ch, rngs)
            if cfg.progressive != "none":
                if i == nlev - 1 or cfg.progressive == "output_skip":
                    up[f"level{i}_pyramid_norm"] = L.GroupNorm(ch, min(ch // 4, 32), eps=1e-6, **dt)
                    if cfg.progressive == "output_skip":
                        up[f"level{i}_pyramid_conv"] = L.Conv2d(ch, cfg.out_channels, 3, kernel_init=out_init, **dt)
                    else:
                        up[f"level{i}_pyramid_conv"] = L.Conv2d(ch, ch, 3, kernel_init=conv_init, **dt)
                if i != nlev - 1:
                    up[f"level{i}_pyramid_up"] = (
                        resample(pyramid_ch, pyramid_ch, up=True, with_conv=False)
                        if cfg.progressive == "output_skip"
                        else resample(pyramid_ch, ch, up=True, with_conv=True)
                    )
                pyramid_ch = cfg.out_channels if cfg.progressive == "output_skip" else ch
            if i != 0:
                if cfg.resblock_type == "ddpm":
                    up[f"level{i}_up"] = resample(ch, ch, up=True, with_conv=cfg.resamp_with_conv)
                else:
                    up[f"level{i}_up"] = block(ch, ch, up=True)
        assert not skip_channels
        self.up = nnx.Dict(up)
        if cfg.progressive != "output_skip":
            self.norm_out = L.GroupNorm(ch, min(ch // 4, 32), eps=1e-6, **dt)
            self.conv_out = L.Conv2d(ch, cfg.out_channels, 3, kernel_init=out_init, **dt)

    def _time_embedding(self, t, y):
        cfg = self.cfg
        s = cfg.time_scale * t
        if cfg.embedding_type == "fourier":
            emb = self.fourier(s)
        else:
            emb = L.sinusoidal_embedding(s, cfg.nf, cos_first=False, endpoint=True)
        if y is not None and self.map_label is not None:
            one_hot = jax.nn.one_hot(y, cfg.num_classes, dtype=jnp.float32)  # the null class -> zeros
            emb = emb + self.map_label(one_hot * math.sqrt(cfg.num_classes)).astype(jnp.float32)
        temb = self.temb1(jax.nn.silu(self.temb0(emb)))
        if y is not None and self.class_embed is not None:
            temb = temb + self.class_embed(y)
        return temb

    def __call__(self, x, t, y=None, *, train: bool = False, rngs=None):
        cfg = self.cfg
        t, y = L.check_image_call(x, t, y, cfg, "SongUNet")
        num_blocks = sum(isinstance(m, SongResBlock) for m in self.down.values())
        num_blocks += 2 + sum(isinstance(m, SongResBlock) for m in self.up.values())
        keys = iter(L.dropout_keys(rngs, train, cfg.dropout, num_blocks))
        run = L.block_runner(cfg.remat)
        temb = self._time_embedding(t, y)
        nlev = len(cfg.ch_mult)
        sqrt2 = math.sqrt(2.0) if cfg.skip_rescale else 1.0

        x = x.astype(cfg.compute_dtype)
        pyramid = x if cfg.progressive_input != "none" else None
        hs = [self.conv_in(x)]
        for i in range(nlev):
            for j in range(cfg.num_res_blocks):
                h = run(self.down[f"level{i}_block{j}"], hs[-1], temb, next(keys))
                if f"level{i}_attn{j}" in self.down:
                    h = run(self.down[f"level{i}_attn{j}"], h)
                hs.append(h)
            if i == nlev - 1:
                continue
            down = self.down[f"level{i}_down"]
            h = run(down, hs[-1], temb, next(keys)) if isinstance(down, SongResBlock) else down(hs[-1])
            if cfg.progressive_input == "input_skip":
                pyramid = L.fir_downsample(pyramid, cfg.fir_kernel) if cfg.fir else L.downsample_mean(pyramid)
                p = self.down[f"level{i}_combine"](pyramid)
                h = jnp.concatenate([p, h], -1) if cfg.progressive_combine == "cat" else p + h
            elif cfg.progressive_input == "residual":
                pyramid = (self.down[f"level{i}_pyramid"](pyramid) + h) / sqrt2
                h = pyramid
            hs.append(h)

        h = run(self.mid_block0, hs[-1], temb, next(keys))
        h = run(self.mid_attn, h)
        h = run(self.mid_block1, h, temb, next(keys))

        pyramid = None
        for i in reversed(range(nlev)):
            for j in range(cfg.num_res_blocks + 1):
                h = run(self.up[f"level{i}_block{j}"], jnp.concatenate([h, hs.pop()], -1), temb, next(keys))
            if f"level{i}_attn" in self.up:
                h = run(self.up[f"level{i}_attn"], h)
            if cfg.progressive != "none":
                if i == nlev - 1:
                    pyramid = self.up[f"level{i}_pyramid_conv"](jax.nn.silu(self.up[f"level{i}_pyramid_norm"](h)))
                elif cfg.progressive == "output_skip":
                    pyramid = self.up[f"level{i}_pyramid_up"](pyramid)
                    pyramid = pyramid + self.up[f"level{i}_pyramid_conv"](
                        jax.nn.silu(self.up[f"level{i}_pyramid_norm"](h))
                    )
                else:
                    pyramid = (self.up[f"level{i}_pyramid_up"](pyramid) + h) / sqrt2
                    h = pyramid
            if i != 0:
                upm = self.up[f"level{i}_up"]
                h = run(upm, h, temb, next(keys)) if isinstance(upm, SongResBlock) else upm(h)
        assert not hs

        if cfg.progressive == "output_skip":
            h = pyramid
        else:
            h = self.conv_out(jax.nn.silu(self.norm_out(h)))
        return h.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Improved DDPM / ADM (Nichol & Dhariwal 2021; Dhariwal & Nichol 2021)
# ----------------------------------------------------------------------------------------------


class ADMResBlock(nnx.Module):
    """ADM residual block: GN-SiLU-conv, time embedding as bias or as AdaGN scale/shift
    (use_scale_shift_norm), GN-SiLU-dropout-zero conv; optional up/down resampling inside."""

    def __init__(
        self,
        cfg: ADMUNetConfig,
        in_ch: int,
        out_ch: int,
        temb_dim: int,
        *,
        up: bool = False,
        down: bool = False,
        rngs: nnx.Rngs,
    ):
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
        self.up, self.down, self.dropout = up, down, cfg.dropout
        self.scale_shift = cfg.use_scale_shift_norm
        self.norm0 = L.GroupNorm(in_ch, cfg.groups(in_ch), eps=cfg.norm_eps, **dt)
        self.conv0 = L.Conv2d(in_ch, out_ch, 3, kernel_init=L.torch_default_init(), **dt)
        self.temb = L.Dense(
            temb_dim,
            out_ch * (2 if self.scale_shift else 1),
            names=("embed", "conv_out"),
            kernel_init=L.torch_default_init(),
            **dt,
        )
        self.norm1 = L.GroupNorm(out_ch, cfg.groups(out_ch), eps=cfg.norm_eps, **dt)
        self.conv1 = L.Conv2d(out_ch, out_ch, 3, kernel_init=L.zeros_init, **dt)
        self.skip = L.Conv2d(in_ch, out_ch, 1, kernel_init=L.torch_default_init(), **dt) if in_ch != out_ch else None

    def _resample(self, x):
        if self.up:
            return L.upsample_nearest(x)
        return L.downsample_mean(x) if self.down else x

    def __call__(self, x, temb, dropout_key):
        h = jax.nn.silu(self.norm0(x))
        h, x = self._resample(h), self._resample(x)
        h = self.conv0(h)
        e = self.temb(jax.nn.silu(temb))[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = self.norm1(h) * (1 + scale) + shift
        else:
            h = self.norm1(h + e)
        h = self.conv1(L.dropout(jax.nn.silu(h), self.dropout, dropout_key))
        skip = self.skip(x) if self.skip is not None else x
        return _channels_constraint(skip.astype(h.dtype) + h)


class ADMUNet(nnx.Module):
    """The U-Net of improved DDPM and ADM ("Diffusion Models Beat GANs", Dhariwal & Nichol 2021):
    sinusoidal time embedding and MLP, class embedding added to it (with a null class), residual
    blocks with AdaGN, multi-head attention at `attn_resolutions` after every block there, and a
    zero-initialised output conv. Also used, small, for the "unet-small" preset.
    """

    def __init__(self, cfg: ADMUNetConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
        mc, nlev = cfg.model_channels, len(cfg.channel_mult)
        self.resolutions = tuple(cfg.hw[0] // 2**i for i in range(nlev))
        temb_dim = 4 * mc
        init = L.torch_default_init()
        self.temb0 = L.Dense(mc, temb_dim, names=(None, "mlp"), kernel_init=init, **dt)
        self.temb1 = L.Dense(temb_dim, temb_dim, names=("mlp", "embed"), kernel_init=init, **dt)
        self.class_embed = (
            L.ClassEmbedding(cfg.num_classes, temb_dim, init=jax.nn.initializers.normal(1.0), **dt)
            if cfg.num_classes
            else None
        )

        def block(cin, cout, **kw):
            return ADMResBlock(cfg, cin, cout, temb_dim, rngs=rngs, **kw)

        def attention(ch):
            heads = ch // cfg.num_head_channels if cfg.num_head_channels != -1 else cfg.num_heads
            return AttnBlock(
                ch,
                heads,
                groups=cfg.groups(ch),
                eps=cfg.norm_eps,
                skip_rescale=False,
                qkv_init=L.torch_default_init(in_axis=0, out_axis=(1, 2, 3)),
                cfg=cfg,
                rngs=rngs,
            )

        def resample(ch, up):
            return L.Resample(
                ch,
                ch,
                up=up,
                with_conv=cfg.conv_resample,
                down_pad=tuple(cfg.downsample_pad),
                kernel_init=init,
                **dt,
            )

        ch = cfg.channel_mult[0] * mc
        self.conv_in = L.Conv2d(cfg.in_channels, ch, 3, kernel_init=init, **dt)
        down: dict[str, nnx.Module] = {}
        skip_channels = [ch]
        for i, mult in enumerate(cfg.channel_mult):
            for j in range(cfg.num_res_blocks):
                down[f"level{i}_block{j}"] = block(ch, mult * mc)
                ch = mult * mc
                if self.resolutions[i] in cfg.attn_resolutions:
                    down[f"level{i}_attn{j}"] = attention(ch)
                skip_channels.append(ch)
            if i != nlev - 1:
                down[f"level{i}_down"] = block(ch, ch, down=True) if cfg.resblock_updown else resample(ch, up=False)
                skip_channels.append(ch)
        self.down = nnx.Dict(down)
        self.mid_block0 = block(ch, ch)
        self.mid_attn = attention(ch)
        self.mid_block1 = block(ch, ch)
        up: dict[str, nnx.Module] = {}
        for i in reversed(range(nlev)):
            mult = cfg.channel_mult[i]
            for j in range(cfg.num_res_blocks + 1):
                up[f"level{i}_block{j}"] = block(ch + skip_channels.pop(), mult * mc)
                ch = mult * mc
                if self.resolutions[i] in cfg.attn_resolutions:
                    up[f"level{i}_attn{j}"] = attention(ch)
            if i != 0:
                up[f"level{i}_up"] = block(ch, ch, up=True) if cfg.resblock_updown else resample(ch, True)
        assert not skip_channels
        self.up = nnx.Dict(up)
        self.down_order, self.up_order = tuple(down), tuple(up)  # forward order of the layers
        self.norm_out = L.GroupNorm(ch, cfg.groups(ch), eps=cfg.norm_eps, **dt)
        self.conv_out = L.Conv2d(ch, cfg.out_channels, 3, kernel_init=L.zeros_init, **dt)

    def __call__(self, x, t, y=None, *, train: bool = False, rngs=None):
        cfg = self.cfg
        t, y = L.check_image_call(x, t, y, cfg, "ADMUNet")
        blocks = [m for m in (*self.down.values(), *self.up.values()) if isinstance(m, ADMResBlock)]
        keys = iter(L.dropout_keys(rngs, train, cfg.dropout, len(blocks) + 2))
        run = L.block_runner(cfg.remat)

        emb = L.sinusoidal_embedding(cfg.time_scale * t, cfg.model_channels, endpoint=cfg.frequency_shift == 1)
        temb = self.temb1(jax.nn.silu(self.temb0(emb)))
        if y is not None:
            temb = temb + self.class_embed(y)

        def apply(m, h):
            return run(m, h, temb, next(keys)) if isinstance(m, ADMResBlock) else run(m, h)

        hs = [self.conv_in(x.astype(cfg.compute_dtype))]
        for name in self.down_order:
            h = apply(self.down[name], hs[-1])
            if "_attn" in name:
                hs[-1] = h  # attention refines the block output it follows
            else:
                hs.append(h)
        h = apply(self.mid_block1, apply(self.mid_attn, apply(self.mid_block0, hs[-1])))
        for name in self.up_order:
            if "_block" in name:
                h = jnp.concatenate([h, hs.pop()], -1)
            h = apply(self.up[name], h)
        assert not hs
        h = self.conv_out(jax.nn.silu(self.norm_out(h)))
        return h.astype(jnp.float32)

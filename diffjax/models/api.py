"""Presets, construction, the functional view of a model, logical partition specs, parameter and
FLOP counts."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import traversals
from jax.extend import core as jex_core

from diffjax.models.configs import ADMUNetConfig, DiTConfig, EDM2UNetConfig, ModelConfig, SongUNetConfig, ToyMLPConfig
from diffjax.models.dit import DiT
from diffjax.models.edm2 import EDM2UNet
from diffjax.models.mlp import ToyMLP
from diffjax.models.unet import ADMUNet, SongUNet

try:  # JAX internals: fast_module_tracing skips building one error message
    from jax._src.interpreters import partial_eval as _partial_eval
except ImportError:
    _partial_eval = None

# Logical axis names carried by parameters (first group) and used for activation constraints
# (second group). The trainer maps them to mesh axes with a rules table, e.g.
# (("layers", None), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ...).
LOGICAL_AXES: dict[str, str] = {
    # parameters
    "layers": "stacked-layer axis of scanned DiT blocks (leading axis)",
    "embed": "model / residual-stream width: DiT hidden size, attention feature width, time "
    "embedding width of the U-Nets",
    "mlp": "expanded hidden width: transformer MLP hidden, adaLN modulation outputs (6D, 2D), time-MLP hidden",
    "heads": "attention heads",
    "kv": "per-head feature width (head_dim)",
    "conv_in": "input channels of a convolution kernel",
    "conv_out": "output channels of a convolution kernel, its bias, and the time projection into a residual block",
    "classes": "rows of the class-embedding table (num_classes + 1, the last one the null class)",
    "norm": "GroupNorm scale and bias",
    # activations (only applied under a mesh with logical axis rules)
    "batch": "activation batch axis",
    "seq": "activation token axis (DiT tokens, U-Net attention pixels)",
    "act_embed": "activation feature axis of DiT tokens",
    "act_mlp": "activation MLP-hidden axis",
    "act_heads": "activation heads axis of q, k, v",
    "act_kv": "activation head_dim axis of q, k, v",
    "act_channels": "activation channel axis of U-Net feature maps",
}
PARAM_AXES = ("layers", "embed", "mlp", "heads", "kv", "conv_in", "conv_out", "classes", "norm")

# EDM2 (Karras et al. 2024) widths: ImageNet-512 on 64x64x4 latents and ImageNet-64 pixels
# (NVlabs/edm2 train_edm2.py config_presets: channels, dropout).
_EDM2_IMG512 = {"xxs": (64, 0.0), "xs": (128, 0.0), "s": (192, 0.0), "m": (256, 0.1), "l": (320, 0.1)}
_EDM2_IMG512 |= {"xl": (384, 0.1), "xxl": (448, 0.1)}
_EDM2_IMG64 = {"xs": (128, 0.0), "s": (192, 0.0), "m": (256, 0.1), "l": (320, 0.1), "xl": (384, 0.1)}

_DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _presets() -> dict[str, ModelConfig]:
    ddpmpp = SongUNetConfig(
        image_size=32,
        in_channels=3,
        nf=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=4,
        attn_resolutions=(16,),
        dropout=0.1,
        resblock_type="biggan",
        fir=False,
        skip_rescale=True,
        progressive="none",
        progressive_input="none",
        embedding_type="positional",
        time_scale=999.0,
    )
    # NCSN++ embeds log(sigma) with Gaussian Fourier features (time_scale 1).
    ncsnpp = dataclasses.replace(
        ddpmpp, fir=True, progressive_input="residual", embedding_type="fourier", fourier_scale=16.0, time_scale=1.0
    )
    presets: dict[str, ModelConfig] = {
        # Small U-Net for 16x16 - 32x32 grey or RGB images, quick on CPU (issue 3).
        "unet-small": ADMUNetConfig(
            image_size=16,
            in_channels=1,
            model_channels=32,
            channel_mult=(1, 2, 2),
            num_res_blocks=2,
            attn_resolutions=(8,),
            num_head_channels=32,
            dropout=0.0,
            resblock_updown=False,
            norm_groups=8,
            time_scale=1000.0,
        ),
        # score-SDE (Song et al. 2021) CIFAR-10 configs: configs/vp/cifar10_ddpmpp_continuous.py etc.
        "DDPM++-cifar10": ddpmpp,
        "DDPM++-cifar10-deep": dataclasses.replace(ddpmpp, num_res_blocks=8),
        "NCSN++-cifar10": ncsnpp,
        "NCSN++-cifar10-deep": dataclasses.replace(ncsnpp, num_res_blocks=8),
        # EDM's re-tuned CIFAR-10 networks (Karras et al. 2022, config F): 3 levels of 256 channels,
        # dropout 0.13, fed EDM's c_noise = log(sigma) / 4 (time_scale 1).
        # Class-conditional versions (num_classes=...) take labels through EDM's map_label.
        "DDPM++-cifar10-edm": dataclasses.replace(
            ddpmpp, ch_mult=(2, 2, 2), dropout=0.13, time_scale=1.0, class_embedding="linear"
        ),
        "NCSN++-cifar10-edm": dataclasses.replace(ncsnpp, ch_mult=(2, 2, 2), dropout=0.13, class_embedding="linear"),
        # Improved DDPM CIFAR-10 (Nichol & Dhariwal 2021) and ADM ImageNet 64x64 (Dhariwal & Nichol).
        "ADM-cifar10": ADMUNetConfig(
            image_size=32,
            in_channels=3,
            model_channels=128,
            channel_mult=(1, 2, 2, 2),
            num_res_blocks=3,
            attn_resolutions=(16, 8),
            num_heads=4,
            num_head_channels=-1,
            dropout=0.3,
            resblock_updown=False,
        ),
        "ADM-imagenet64": ADMUNetConfig(
            image_size=64,
            in_channels=3,
            num_classes=1000,
            model_channels=192,
            channel_mult=(1, 2, 3, 4),
            num_res_blocks=3,
            attn_resolutions=(32, 16, 8),
            num_head_channels=64,
            dropout=0.1,
            resblock_updown=True,
        ),
    }
    # DiT (Peebles & Xie 2023) on 256x256 images = 32x32x4 latents, 1000 classes.
    for size, (depth, hidden, heads) in _DIT_SIZES.items():
        for patch in (2, 4, 8):
            presets[f"DiT-{size}/{patch}"] = DiTConfig(
                image_size=32,
                in_channels=4,
                num_classes=1000,
                patch_size=patch,
                hidden_size=hidden,
                depth=depth,
                num_heads=heads,
            )
    for size, (channels, dropout) in _EDM2_IMG512.items():
        presets[f"EDM2-img512-{size}"] = EDM2UNetConfig(
            image_size=64, in_channels=4, num_classes=1000, model_channels=channels, dropout=dropout
        )
    for size, (channels, dropout) in _EDM2_IMG64.items():
        presets[f"EDM2-img64-{size}"] = EDM2UNetConfig(
            image_size=64, in_channels=3, num_classes=1000, model_channels=channels, dropout=dropout
        )
    return presets


PRESETS: dict[str, ModelConfig] = _presets()
_MODEL_CLASSES = {
    SongUNetConfig: SongUNet,
    ADMUNetConfig: ADMUNet,
    DiTConfig: DiT,
    EDM2UNetConfig: EDM2UNet,
    ToyMLPConfig: ToyMLP,
}


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def _coerce(value: Any) -> Any:
    """Lists (e.g. from ml_collections) become tuples so configs stay hashable."""
    if isinstance(value, list):
        return tuple(_coerce(v) for v in value)
    if isinstance(value, (jnp.dtype, type)):  # jnp.bfloat16, np.float32, jnp.dtype("float32")
        try:
            return jnp.dtype(value).name
        except TypeError:
            return value
    return value


def get_config(name: str, **overrides) -> ModelConfig:
    """The validated configuration of preset `name` with `overrides` applied (no model is built)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    base = PRESETS[name]
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown override(s) {unknown} for {name!r} ({type(base).__name__}); allowed: {sorted(fields)}"
        )
    return dataclasses.replace(base, **{k: _coerce(v) for k, v in overrides.items()}).validate()


_TRACER = getattr(_partial_eval, "DynamicJaxprTracer", None)
# The tracer's own origin message (None: a JAX without it), the number of active
# fast_module_tracing contexts, and the lock that guards both switches.
_COSTLY_ORIGIN_MSG = vars(_TRACER).get("_origin_msg") if _TRACER is not None else None
_FAST_TRACING = {"depth": 0, "lock": threading.Lock()}


@contextlib.contextmanager
def fast_module_tracing() -> Iterator[None]:
    """Build modules under a trace (nnx.eval_shape, a jitted initialiser) in time linear in their size.

    flax NNX probes `getattr(value, "sharding", None)` on every variable update. On a tracer that
    raises an AttributeError whose message JAX (0.10) builds by walking every equation traced so far
    (see jax-ml/jax pull request 40041), so building a model under a trace is quadratic in its size.
    Inside this context tracers skip building that part of the message (where the tracer came from);
    nothing else changes. Nests, and is safe across threads (the last context to exit restores JAX).
    """
    if _COSTLY_ORIGIN_MSG is None:
        yield
        return
    with _FAST_TRACING["lock"]:
        _FAST_TRACING["depth"] += 1
        _TRACER._origin_msg = lambda self: ""
    try:
        yield
    finally:
        with _FAST_TRACING["lock"]:
            _FAST_TRACING["depth"] -= 1
            if _FAST_TRACING["depth"] == 0:
                _TRACER._origin_msg = _COSTLY_ORIGIN_MSG


def build(config: ModelConfig | ToyMLPConfig, *, rngs: nnx.Rngs | None = None, seed: int = 0) -> nnx.Module:
    """Build the model for a configuration object (SongUNetConfig, ADMUNetConfig, DiTConfig or
    ToyMLPConfig, e.g. `build(ToyMLPConfig(data_dim=2))` for 2-D toy data)."""
    if type(config) not in _MODEL_CLASSES:
        raise ValueError(
            f"unsupported config type {type(config).__name__}; expected one of {[c.__name__ for c in _MODEL_CLASSES]}"
        )
    config.validate()
    with fast_module_tracing():
        return _MODEL_CLASSES[type(config)](config, rngs=rngs if rngs is not None else nnx.Rngs(seed))


def create(name: str, *, rngs: nnx.Rngs | None = None, seed: int = 0, **overrides) -> nnx.Module:
    """Build preset `name` (see `preset_names()`) with config `overrides`, e.g.
    `create("DiT-B/2", dtype="bfloat16", remat="dots")`. Parameters are initialised from `rngs` (or
    `nnx.Rngs(seed)`). Use `nnx.eval_shape(lambda: create(...))` for an abstract model."""
    return build(get_config(name, **overrides), rngs=rngs, seed=seed)


# ----------------------------------------------------------------------------------------------
# Functional view, logical specs, counts
# ----------------------------------------------------------------------------------------------


def functional(model: nnx.Module) -> tuple[Callable, dict]:
    """Split `model` once into a pure `apply(params, x, t, y=None, *, key=None)` and its params.

    params is a nested dict of arrays (the nnx.Param leaves; for an abstract model, of
    ShapeDtypeStructs). `key=None` runs in inference mode (no dropout); a key turns on training-mode
    dropout with randomness from that key. apply is a pure function of its arguments.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)

    def apply(params, x, t, y=None, *, key=None):
        m = nnx.merge(graphdef, params, rest)
        return m(x, t, y, train=key is not None, rngs=key)

    return apply, params


def _flat_params(model_or_state) -> list:
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return list(nnx.to_flat_state(state))


def logical_partition_specs(model: nnx.Module) -> dict:
    """Nested dict (same structure as `functional(model)[1]`) of PartitionSpecs of logical axis names
    (see LOGICAL_AXES); works on abstract models from nnx.eval_shape."""
    flat = {}
    for path, var in _flat_params(model):
        names = var.get_metadata().get("out_sharding")
        if names is None or len(names) != len(var.shape):
            raise ValueError(
                f"parameter {'/'.join(map(str, path))} of shape {var.shape} has no "
                f"complete logical axis names ({names})"
            )
        flat[path] = jax.sharding.PartitionSpec(*names)
    return traversals.unflatten_mapping(flat)


def param_count(model_or_params) -> int:
    """Number of scalars in the nnx.Param leaves of a model (abstract or not) or in a params tree."""
    if isinstance(model_or_params, nnx.Module):
        return sum(math.prod(v.shape) for _, v in _flat_params(model_or_params))
    return sum(math.prod(jnp.shape(a)) for a in jax.tree.leaves(model_or_params))


def dit_forward_macs(cfg: DiTConfig, batch: int = 1, *, out_channels: int | None = None) -> int:
    """Multiply-adds of one DiT forward pass (the paper's "Gflops" are these counts / 1e9).

    Per block with T tokens, width D, MLP width M: qkv 3TD^2, scores and values 2T^2D, projection
    TD^2, MLP 2TDM, adaLN 6D^2; plus patch embedding, time MLP, final adaLN and linear.
    `out_channels` defaults to in_channels (the reference DiT predicts 2x channels: learned sigma).
    """
    t, d, m = cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden
    p2 = cfg.patch_size**2
    c_out = cfg.in_channels if out_channels is None else out_channels
    block = 3 * t * d * d + 2 * t * t * d + t * d * d + 2 * t * d * m + 6 * d * d
    embed = t * p2 * cfg.in_channels * d + cfg.frequency_embedding_size * d + d * d
    final = 2 * d * d + t * d * p2 * c_out
    return batch * (cfg.depth * block + embed + final)


def forward_macs(model: nnx.Module, batch: int = 1, *, count_padding: bool = True) -> int:
    """Multiply-adds of every matmul and convolution in the traced forward pass of `model` (abstract
    models work: nothing is computed). Attention counts 2 * B * heads * S_q * S_k * head_dim
    whatever kernel implements it; scanned layers count `length` times.

    count_padding=True counts every kernel tap of a convolution (the usual convention, e.g. fvcore);
    False skips taps that fall on zero padding or on zeros inserted by input dilation, which is how
    XLA's cost analysis counts convolutions.
    """
    apply, params = functional(model)
    cfg = model.cfg
    data_shape = (cfg.data_dim,) if isinstance(cfg, ToyMLPConfig) else (*cfg.hw, cfg.in_channels)
    x = jax.ShapeDtypeStruct((batch, *data_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32) if cfg.num_classes else None
    closed = jax.make_jaxpr(lambda p, x, t, y: apply(p, x, t, y))(params, x, t, y)
    return _jaxpr_macs(closed.jaxpr, count_padding)


def _sub_jaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _valid_taps(in_size: int, out_size: int, k: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int) -> int:
    """(output position, kernel tap) pairs of one spatial axis that read a real input element."""
    span = (in_size - 1) * lhs_dil + 1
    count = 0
    for o in range(out_size):
        for j in range(k):
            i = o * stride + j * rhs_dil - pad_lo
            count += 0 <= i < span and i % lhs_dil == 0
    return count


def _conv_macs(eqn, count_padding: bool) -> int:
    lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    dn, params = eqn.params["dimension_numbers"], eqn.params
    if count_padding:
        return math.prod(out) * math.prod(rhs) // rhs[dn.rhs_spec[0]]
    taps = 1
    for axis, (lhs_d, rhs_d, out_d) in enumerate(zip(dn.lhs_spec[2:], dn.rhs_spec[2:], dn.out_spec[2:])):
        taps *= _valid_taps(
            lhs[lhs_d],
            out[out_d],
            rhs[rhs_d],
            params["window_strides"][axis],
            params["padding"][axis][0],
            params["lhs_dilation"][axis],
            params["rhs_dilation"][axis],
        )
    return out[dn.out_spec[0]] * rhs[dn.rhs_spec[0]] * rhs[dn.rhs_spec[1]] * taps


def _jaxpr_macs(jaxpr, count_padding: bool = True) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        prim = eqn.primitive.name
        if prim == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
        elif prim == "conv_general_dilated":
            total += _conv_macs(eqn, count_padding)
        elif eqn.params.get("name") == "diffjax_attention":
            b, sq, heads, dh = eqn.invars[0].aval.shape
            sk = eqn.invars[1].aval.shape[1]
            total += 2 * b * heads * sq * sk * dh
        elif prim == "scan":
            total += eqn.params["length"] * _jaxpr_macs(eqn.params["jaxpr"].jaxpr, count_padding)
        elif prim == "cond":
            total += max(_jaxpr_macs(j, count_padding) for j in _sub_jaxprs(eqn.params["branches"]))
        elif prim == "while":
            raise ValueError("forward_macs: while loops have no static trip count")
        else:
            total += sum(_jaxpr_macs(j, count_padding) for v in eqn.params.values() for j in _sub_jaxprs(v))
    return total

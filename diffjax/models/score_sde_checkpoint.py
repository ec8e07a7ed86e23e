"""score_sde's Flax checkpoints (Song et al. 2021, "Score-Based Generative Modeling through SDEs",
github.com/yang-song/score_sde) as our `SongUNet`: `load_pretrained(path, format="score-sde",
config=...)`.

A checkpoint is the msgpack file `flax.training.checkpoints.save_checkpoint` writes of score_sde's
training `State` (step, optimizer {target, state}, lr, model_state, ema_rate, params_ema, rng); it is
read with `flax.serialization.msgpack_restore`, without score_sde's code. The weights are `params_ema`
(what score_sde samples and evaluates with) or, with `weights="target"`, `optimizer.target`; a file
holding the parameter tree alone is read too, and a checkpoint folder gives its newest
`checkpoint_<step>`. Module names are linen's automatic ones
(`ResnetBlockBigGANpp_7/Conv_1/kernel`), handed out per class in the order `NCSNpp.__call__` creates
the modules, which is the order our `SongUNet` keeps; flax kernels are already HWIO / (in, out).

The checkpoint has no hyper-parameters: `config` is one of `SCORE_SDE_CONFIGS` (score_sde's config
file names, e.g. "ve/cifar10_ncsnpp_continuous") or score_sde's own `ml_collections` config (or a
mapping of the same sections `model`, `data`, `training`). Every parameter's shape is checked against
the config, in creation order; the error names the first score_sde parameter that does not fit.

Covered: the `ncsnpp` model with BigGAN residual blocks, no output pyramid (`progressive="none"`), input
pyramid "none" or "residual", Fourier or positional time embedding, unconditional; on the VE SDE
(continuous training), the VP and sub-VP SDEs (continuous) and the discrete DDPM chain (VP,
`training.continuous=False`). That is every CIFAR-10 NCSN++ / DDPM++ config of score_sde except the
discrete VE one (ve/cifar10_ncsnpp.py). Not covered: `progressive="output_skip"` / `input_skip`
(its 256 px and 1024 px VE configs), DDPM-type residual blocks, the `ddpm` and `ncsnv2` models.

score_sde's conventions and their diffjax form (models/utils.py `get_score_fn`, sde_lib.py, and
`NCSNpp.__call__`):

- data: with `data.centered=False` (its VE configs) the data are in [0, 1] and the network computes
  2x - 1 first. In diffjax's data space x' = 2x - 1 in [-1, 1] the network sees x'_t = x'_0 + 2 sigma
  eps directly: the VE SDE with sigma in [0.01, 50] is our `VE(0.02, 100)`. Centered configs (VP,
  sub-VP) are used as they are; VP with uncentered data is refused (no Gaussian path on [-1, 1]).
- VE (continuous): the network sees log sigma through Gaussian Fourier features and with
  `scale_by_sigma` returns h / sigma = the score of [0, 1]-data, so h = -eps: prediction "eps",
  `output_sign=-1`, network time log(sigma'(t) / 2) (log(sigma(t)) when centered), as EDM's
  VEPrecond.
- VP and sub-VP (continuous): network time 999 t (sinusoidal features), score = -h / sigma(t), so h =
  eps: `VP(beta_min, beta_max)` / `SubVP(...)`, prediction "eps".
- discrete VP (DDPM): betas linspace(beta_min / N, beta_max / N, N), the network trained at the
  integer step j; our `DiscreteVP` of those betas with step j = N t - 1 (score_sde's `get_score_fn`
  evaluates its time t at label t (N - 1): the same network input, equal where that label is an
  integer). `score_sde_score_fn` gives score_sde's score function in its own time and coordinates.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import serialization
from flax.nnx import traversals

from diffjax.models.api import get_config
from diffjax.processes import VE, VP, DiscreteVP, SubVP
from diffjax.validation import check_choice

WEIGHTS = ("ema", "target")
_SDES = ("vesde", "vpsde", "subvpsde")


def _named_config(sde: str, arch: str, num_res_blocks: int, continuous: bool = True) -> dict:
    """One of score_sde's CIFAR-10 configs (configs/<sde>/cifar10_<arch>[_deep]_continuous.py on
    default_cifar10_configs.py), in its own layout."""
    ve = sde == "vesde"
    model = dict(
        name="ncsnpp",
        nf=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=num_res_blocks,
        attn_resolutions=(16,),
        resamp_with_conv=True,
        conditional=True,
        fir=arch == "ncsnpp",
        fir_kernel=(1, 3, 3, 1),
        skip_rescale=True,
        resblock_type="biggan",
        progressive="none",
        progressive_input="residual" if arch == "ncsnpp" else "none",
        progressive_combine="sum",
        embedding_type="fourier" if ve else "positional",
        fourier_scale=16.0,
        init_scale=0.0,
        scale_by_sigma=ve,
        nonlinearity="swish",
        normalization="GroupNorm",
        sigma_min=0.01,
        sigma_max=50.0,
        num_scales=1000,
        beta_min=0.1,
        beta_max=20.0,
        dropout=0.1,
    )
    data = dict(image_size=32, num_channels=3, centered=not ve)
    return dict(model=model, data=data, training=dict(sde=sde, continuous=continuous))


SCORE_SDE_CONFIGS: Mapping[str, dict] = MappingProxyType(
    {
        "ve/cifar10_ncsnpp_continuous": _named_config("vesde", "ncsnpp", 4),
        "ve/cifar10_ncsnpp_deep_continuous": _named_config("vesde", "ncsnpp", 8),
        **{
            f"{folder}/cifar10_{arch}{deep}_continuous": _named_config(sde, arch, 8 if deep else 4)
            for folder, sde in (("vp", "vpsde"), ("subvp", "subvpsde"))
            for arch in ("ddpmpp", "ncsnpp")
            for deep in ("", "_deep")
        },
        "vp/cifar10_ddpmpp": _named_config("vpsde", "ddpmpp", 4, continuous=False),
        "vp/cifar10_ncsnpp": _named_config("vpsde", "ncsnpp", 4, continuous=False),
    }
)

# What the reader needs from each section of a score_sde config.
CONFIG_FIELDS = {
    "model": (
        "name",
        "nf",
        "ch_mult",
        "num_res_blocks",
        "attn_resolutions",
        "resamp_with_conv",
        "conditional",
        "fir",
        "fir_kernel",
        "skip_rescale",
        "resblock_type",
        "progressive",
        "progressive_input",
        "embedding_type",
        "scale_by_sigma",
        "nonlinearity",
        "normalization",
        "sigma_min",
        "sigma_max",
        "num_scales",
        "beta_min",
        "beta_max",
    ),
    "data": ("image_size", "num_channels", "centered"),
    "training": ("sde", "continuous"),
}


# ----------------------------------------------------------------------------------------------
# The file
# ----------------------------------------------------------------------------------------------


def is_score_sde_checkpoint(path: str | Path) -> bool:
    """Whether `path` starts like a flax msgpack checkpoint: a map whose first key is a string (a
    pickle starts with 0x80 and its protocol 2..5, a zip with "PK"; safetensors starts with its
    header's length and then "{", which no msgpack map key of the state can hold); for a folder,
    whether its newest `checkpoint_<step>` file does."""
    path = Path(path)
    if path.is_dir():
        return bool(_checkpoint_steps(path)) and is_score_sde_checkpoint(latest_score_sde_checkpoint(path))
    with open(path, "rb") as f:
        head = f.read(10)
    if len(head) == 10 and head[8:9] == b"{":  # safetensors: u64 header length, then the JSON header
        return False
    if len(head) < 2:
        return False
    first = head[0]
    if 0x81 <= first <= 0x8F:
        key = head[1:2]
    elif first == 0xDE:
        key = head[3:4]
    elif first == 0xDF:
        key = head[5:6]
    else:
        return False
    return bool(key) and (0xA0 <= key[0] <= 0xBF or key[0] == 0xD9)


def _checkpoint_steps(folder: Path) -> dict[int, Path]:
    return {
        int(p.name.split("_")[1]): p
        for p in folder.glob("checkpoint_*")
        if p.is_file() and p.name.split("_")[1].isdigit()
    }


def latest_score_sde_checkpoint(folder: str | Path) -> Path:
    """The newest `checkpoint_<step>` file of a score_sde checkpoint folder (what
    `flax.training.checkpoints.restore_checkpoint(folder, ...)` restores)."""
    folder = Path(folder)
    steps = _checkpoint_steps(folder)
    if not steps:
        raise ValueError(f"{str(folder)!r} holds no score_sde checkpoint_<step> file")
    return steps[max(steps)]


def read_score_sde_params(path: str | Path, weights: str = "ema") -> dict:
    """The parameter tree of a score_sde checkpoint: `params_ema` ("ema") or `optimizer.target`
    ("target") of its training state, or the file's tree itself when it holds parameters alone."""
    check_choice("score-sde weights", weights, WEIGHTS)
    try:
        tree = serialization.msgpack_restore(Path(path).read_bytes())
    except (ValueError, TypeError) as error:  # msgpack's errors on truncated or foreign files
        raise ValueError(f"{str(path)!r} is not a readable flax msgpack checkpoint ({error})") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{str(path)!r} holds a {type(tree).__name__}, not a score_sde training state")
    if "params_ema" in tree or "optimizer" in tree:
        params = tree.get("params_ema") if weights == "ema" else (tree.get("optimizer") or {}).get("target")
        if not isinstance(params, dict):
            where = "params_ema" if weights == "ema" else "optimizer.target"
            raise ValueError(f"{str(path)!r}: the score_sde training state has no {where}")
        return params
    if any(k.startswith(("Dense_", "Conv_", "ResnetBlock")) for k in tree):
        if weights != "ema":
            raise ValueError(f"{str(path)!r} holds one parameter tree; weights={weights!r} needs a training state")
        return tree
    raise ValueError(
        f"{str(path)!r}: not a score_sde checkpoint (top-level keys {sorted(tree)[:6]}; expected its training "
        "state with params_ema and optimizer, or the NCSNpp parameter tree)"
    )


# ----------------------------------------------------------------------------------------------
# The config
# ----------------------------------------------------------------------------------------------


def score_sde_config(config: Any) -> dict:
    """score_sde's config (a name of SCORE_SDE_CONFIGS, its ml_collections ConfigDict, or a mapping
    with sections model / data / training) as a plain dict of the fields the reader uses, checked."""
    if isinstance(config, str):
        check_choice("score_sde config", config, SCORE_SDE_CONFIGS)
        config = SCORE_SDE_CONFIGS[config]
    if config is None:
        raise ValueError(
            "format 'score-sde' needs config=: the checkpoint holds no hyper-parameters; pass one of "
            f"{sorted(SCORE_SDE_CONFIGS)} or score_sde's config (ml_collections, or a dict of model/data/training)"
        )
    plain = {}
    for section, fields in CONFIG_FIELDS.items():
        try:
            values = config[section]
        except (KeyError, AttributeError, TypeError):
            raise ValueError(f"score_sde config: no section {section!r} (needs {list(CONFIG_FIELDS)})") from None
        missing = [f for f in fields if f not in values]
        if missing:
            raise ValueError(f"score_sde config: {section} has no {missing}")
        plain[section] = {f: tuple(values[f]) if isinstance(values[f], list) else values[f] for f in fields}
    _check_supported(plain)
    return plain


_TEXT_FIELDS = {
    "model": ("name", "resblock_type", "progressive", "progressive_input", "embedding_type", "nonlinearity"),
    "training": ("sde",),
}


def _check_supported(cfg: dict) -> None:
    m, d, tr = cfg["model"], cfg["data"], cfg["training"]
    for section, fields in _TEXT_FIELDS.items():
        for field in fields:
            if not isinstance(cfg[section][field], str):
                raise ValueError(f"score_sde config {section}.{field}={cfg[section][field]!r} must be a string")
    need = dict(
        name="ncsnpp",
        resblock_type="biggan",
        progressive="none",
        conditional=True,
        resamp_with_conv=True,
        nonlinearity="swish",
        normalization="GroupNorm",
    )
    for field, value in need.items():
        got = m[field].lower() if isinstance(m[field], str) else m[field]
        if got != (value.lower() if isinstance(value, str) else value):
            raise ValueError(f"score_sde config model.{field}={m[field]!r} is not supported (only {value!r})")
    if m["progressive_input"].lower() not in ("none", "residual"):
        raise ValueError(
            f"score_sde config model.progressive_input={m['progressive_input']!r} is not supported ('none', 'residual')"
        )
    if m["progressive_input"].lower() == "residual" and not m["fir"]:
        raise ValueError("score_sde config: progressive_input='residual' with model.fir=False is not supported")
    check_choice("score_sde config training.sde", tr["sde"].lower(), _SDES)
    check_choice("score_sde config model.embedding_type", m["embedding_type"].lower(), ("fourier", "positional"))
    sde = tr["sde"].lower()
    if sde == "vesde":
        if not tr["continuous"]:
            raise ValueError("score_sde config: the discrete VE SDE (training.continuous=False) is not supported")
        if not m["scale_by_sigma"] or m["embedding_type"].lower() != "fourier":
            raise ValueError("score_sde config: VE needs model.scale_by_sigma=True and embedding_type='fourier'")
    else:
        if not tr["continuous"] and m["embedding_type"].lower() == "fourier":
            raise ValueError("score_sde config: the discrete VP chain with Fourier features is not supported")
        if m["scale_by_sigma"]:
            raise ValueError(f"score_sde config: {sde} with model.scale_by_sigma=True is not supported")
        if not d["centered"]:
            raise ValueError(
                f"score_sde config: {sde} with data.centered=False (network input 2x - 1 of [0, 1] data) is not "
                "a Gaussian path on [-1, 1]; not supported"
            )


def _preset_and_overrides(cfg: dict) -> tuple[str, dict]:
    """Our preset and SongUNetConfig fields for a checked score_sde config (dropout 0: the loaded
    network is for inference; set it again to fine-tune)."""
    m, d = cfg["model"], cfg["data"]
    fourier = m["embedding_type"].lower() == "fourier"
    fir = bool(m["fir"])
    return "NCSN++-cifar10" if fourier else "DDPM++-cifar10", dict(
        image_size=int(d["image_size"]),
        in_channels=int(d["num_channels"]),
        nf=int(m["nf"]),
        ch_mult=tuple(int(c) for c in m["ch_mult"]),
        num_res_blocks=int(m["num_res_blocks"]),
        attn_resolutions=tuple(int(r) for r in m["attn_resolutions"]),
        resblock_type="biggan",
        resamp_with_conv=True,
        fir=fir,
        fir_kernel=tuple(float(k) for k in m["fir_kernel"]) if fir else (1, 3, 3, 1),
        skip_rescale=bool(m["skip_rescale"]),
        progressive="none",
        progressive_input=m["progressive_input"].lower(),
        embedding_type="fourier" if fourier else "positional",
        time_scale=1.0,
        dropout=0.0,
    )


# ----------------------------------------------------------------------------------------------
# The parameters: linen's automatic names in NCSNpp's creation order
# ----------------------------------------------------------------------------------------------


class _Scope:
    """One linen module of the checkpoint: its children named <Class>_<k>, k counted per class in
    creation order; every leaf taken is checked against the shape the config gives it."""

    def __init__(self, tree: dict, prefix: str, used: set):
        self.tree, self.prefix, self.used, self.counts = tree, prefix, used, {}

    def child(self, cls: str) -> _Scope:
        k = self.counts.get(cls, 0)
        self.counts[cls] = k + 1
        name = f"{cls}_{k}"
        if not isinstance(self.tree.get(name), dict):
            raise ValueError(
                f"score_sde checkpoint has no module {self.prefix}{name}, which the config needs: the config "
                "does not match the checkpoint"
            )
        return _Scope(self.tree[name], f"{self.prefix}{name}/", self.used)

    def leaf(self, name: str, shape: tuple, ours: str) -> np.ndarray:
        value = self.tree.get(name)
        if value is None:
            raise ValueError(f"score_sde checkpoint has no parameter {self.prefix}{name} (for our {ours})")
        value = np.asarray(value)
        if tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"score_sde parameter {self.prefix}{name} has shape {tuple(value.shape)}, but the config gives "
                f"{tuple(shape)} (our {ours}): the config does not match the checkpoint"
            )
        self.used.add(self.prefix + name)
        return value


def _kernel_and_bias(scope: _Scope, kernel: tuple, ours: str) -> dict:
    """nn.Dense, nn.Conv (kernel (in, out) / HWIO, bias) and StyleGAN2's Conv2d (weight HWIO, bias)."""
    name = "weight" if "weight" in scope.tree else "kernel"
    return {
        "kernel": scope.leaf(name, kernel, f"{ours}/kernel"),
        "bias": scope.leaf("bias", kernel[-1:], f"{ours}/bias"),
    }


def _norm(scope: _Scope, channels: int, ours: str) -> dict:
    return {
        "scale": scope.leaf("scale", (channels,), f"{ours}/scale"),
        "bias": scope.leaf("bias", (channels,), f"{ours}/bias"),
    }


def _resblock(scope: _Scope, cin: int, cout: int, temb: int, ours: str, resample: bool = False) -> dict:
    """ResnetBlockBigGANpp: GroupNorm_0, Conv_0, Dense_0, GroupNorm_1, Conv_1, and Conv_2 (1x1 skip)
    when the channels change or the block resamples."""
    out = {
        "norm0": _norm(scope.child("GroupNorm"), cin, f"{ours}/norm0"),
        "conv0": _kernel_and_bias(scope.child("Conv"), (3, 3, cin, cout), f"{ours}/conv0"),
        "temb": _kernel_and_bias(scope.child("Dense"), (temb, cout), f"{ours}/temb"),
        "norm1": _norm(scope.child("GroupNorm"), cout, f"{ours}/norm1"),
        "conv1": _kernel_and_bias(scope.child("Conv"), (3, 3, cout, cout), f"{ours}/conv1"),
    }
    if cin != cout or resample:
        out["skip"] = _kernel_and_bias(scope.child("Conv"), (1, 1, cin, cout), f"{ours}/skip")
    return out


def _attention(scope: _Scope, c: int, ours: str) -> dict:
    """AttnBlockpp: GroupNorm_0, then NIN_0..3 (W (C, C), b) for q, k, v and the output, one head."""
    norm = _norm(scope.child("GroupNorm"), c, f"{ours}/norm")
    nin = []
    for part in ("q", "k", "v", "out"):
        s = scope.child("NIN")
        nin.append((s.leaf("W", (c, c), f"{ours}/attn ({part})"), s.leaf("b", (c,), f"{ours}/attn ({part})")))
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = nin
    return {
        "norm": norm,
        "attn": {
            "qkv": {"kernel": np.stack([wq, wk, wv], axis=1)[:, :, None, :], "bias": np.stack([bq, bk, bv])[:, None]},
            "out": {"kernel": wo[None], "bias": bo},
        },
    }


def _translate(tree: dict, cfg) -> dict:
    """Our SongUNet parameters (config `cfg`) from score_sde's NCSNpp tree, walked in NCSNpp's creation
    order with its channel bookkeeping."""
    top = _Scope(tree, "", set())
    nf, nlev, c_in = cfg.nf, len(cfg.ch_mult), cfg.in_channels
    temb = 4 * nf
    params: dict = {}
    if cfg.embedding_type == "fourier":
        params["fourier"] = {"freqs": top.child("GaussianFourierProjection").leaf("W", (nf,), "fourier/freqs")}
    params["temb0"] = _kernel_and_bias(
        top.child("Dense"), (2 * nf if cfg.embedding_type == "fourier" else nf, temb), "temb0"
    )
    params["temb1"] = _kernel_and_bias(top.child("Dense"), (temb, temb), "temb1")
    params["conv_in"] = _kernel_and_bias(top.child("Conv"), (3, 3, c_in, nf), "conv_in")
    resolutions = [cfg.hw[0] // 2**i for i in range(nlev)]
    down, up, skips, ch, pyramid = {}, {}, [nf], nf, c_in
    for i in range(nlev):
        for j in range(cfg.num_res_blocks):
            out = nf * cfg.ch_mult[i]
            down[f"level{i}_block{j}"] = _resblock(
                top.child("ResnetBlockBigGANpp"), ch, out, temb, f"down/level{i}_block{j}"
            )
            ch = out
            if resolutions[i] in cfg.attn_resolutions:
                down[f"level{i}_attn{j}"] = _attention(top.child("AttnBlockpp"), ch, f"down/level{i}_attn{j}")
            skips.append(ch)
        if i == nlev - 1:
            continue
        down[f"level{i}_down"] = _resblock(top.child("ResnetBlockBigGANpp"), ch, ch, temb, f"down/level{i}_down", True)
        if cfg.progressive_input == "residual":
            conv = top.child("Downsample").child("Conv2d")
            down[f"level{i}_pyramid"] = {
                "conv": _kernel_and_bias(conv, (3, 3, pyramid, ch), f"down/level{i}_pyramid/conv")
            }
            pyramid = ch
        skips.append(ch)
    params["down"] = down
    params["mid_block0"] = _resblock(top.child("ResnetBlockBigGANpp"), ch, ch, temb, "mid_block0")
    params["mid_attn"] = _attention(top.child("AttnBlockpp"), ch, "mid_attn")
    params["mid_block1"] = _resblock(top.child("ResnetBlockBigGANpp"), ch, ch, temb, "mid_block1")
    for i in reversed(range(nlev)):
        for j in range(cfg.num_res_blocks + 1):
            out = nf * cfg.ch_mult[i]
            up[f"level{i}_block{j}"] = _resblock(
                top.child("ResnetBlockBigGANpp"), ch + skips.pop(), out, temb, f"up/level{i}_block{j}"
            )
            ch = out
        if resolutions[i] in cfg.attn_resolutions:
            up[f"level{i}_attn"] = _attention(top.child("AttnBlockpp"), ch, f"up/level{i}_attn")
        if i != 0:
            up[f"level{i}_up"] = _resblock(top.child("ResnetBlockBigGANpp"), ch, ch, temb, f"up/level{i}_up", True)
    params["up"] = up
    params["norm_out"] = _norm(top.child("GroupNorm"), ch, "norm_out")
    params["conv_out"] = _kernel_and_bias(top.child("Conv"), (3, 3, ch, c_in), "conv_out")
    unused = sorted(set("/".join(k) for k in traversals.flatten_mapping(tree)) - top.used)
    if unused:
        raise ValueError(
            f"score_sde parameter(s) {unused[:5]} are not used by the config (a deeper or wider network?): the "
            "config does not match the checkpoint"
        )
    return params


# ----------------------------------------------------------------------------------------------
# Process, prediction and network time
# ----------------------------------------------------------------------------------------------


def _data_scale(cfg: dict) -> float:
    """scale in x' = scale x - (scale - 1): 2 for [0, 1] data (data.centered=False), 1 for centered data."""
    return 1.0 if cfg["data"]["centered"] else 2.0


def _denoiser_extras(cfg: dict) -> dict:
    """Process, prediction and network time input of a checked score_sde config."""
    m, sde = cfg["model"], cfg["training"]["sde"].lower()
    fourier = m["embedding_type"].lower() == "fourier"
    label_to_input = (lambda label: jnp.log(label)) if fourier else (lambda label: label)  # noqa: E731
    if sde == "vesde":
        scale = _data_scale(cfg)
        process = VE(sigma_min=scale * float(m["sigma_min"]), sigma_max=scale * float(m["sigma_max"]))
        return dict(
            process=process,
            prediction="eps",
            learned_variance=False,
            time_input=lambda t: label_to_input(process.sigma(t) / scale),
            output_sign=-1.0,
        )
    beta_min, beta_max, n = float(m["beta_min"]), float(m["beta_max"]), int(m["num_scales"])
    if sde == "vpsde" and not cfg["training"]["continuous"]:
        process = DiscreteVP.from_betas(np.linspace(beta_min / n, beta_max / n, n))
        return dict(
            process=process,
            prediction="eps",
            learned_variance=False,
            time_input=lambda t: label_to_input(jnp.asarray(t, jnp.float32) * n - 1.0),
        )
    process = (VP if sde == "vpsde" else SubVP)(beta_min=beta_min, beta_max=beta_max)
    return dict(
        process=process,
        prediction="eps",
        learned_variance=False,
        time_input=lambda t: label_to_input(999.0 * jnp.asarray(t, jnp.float32)),
    )


def from_score_sde(path: Path, options: dict):
    """(preset, overrides, params, extras, remaining options) for `load_pretrained`'s `_finish`."""
    cfg = score_sde_config(options.pop("config", None))
    path = latest_score_sde_checkpoint(path) if Path(path).is_dir() else path
    tree = read_score_sde_params(path, options.pop("weights", "ema"))
    preset, overrides = _preset_and_overrides(cfg)
    params = _translate(tree, get_config(preset, **overrides))
    return preset, overrides, params, _denoiser_extras(cfg), options


def _score_sde_coordinates(config: Any) -> tuple[dict, float, Callable]:
    """(checked config, data scale (x' = scale x - (scale - 1)), score_sde time -> our time)."""
    cfg = score_sde_config(config)
    n = int(cfg["model"]["num_scales"])
    if cfg["training"]["sde"].lower() == "vpsde" and not cfg["training"]["continuous"]:
        return cfg, _data_scale(cfg), lambda t: (jnp.asarray(t, jnp.float32) * (n - 1) + 1.0) / n
    return cfg, _data_scale(cfg), lambda t: jnp.asarray(t, jnp.float32)


def score_sde_score_fn(pretrained, config: Any) -> Callable:
    """score_sde's `get_score_fn(sde, model, ...)` from a checkpoint loaded with that `config`:
    `fn(x, t)` the score in score_sde's coordinates (data in [0, 1] unless data.centered) and time
    (for the discrete VP chain, the label t (N - 1) is the step j, our time (j + 1) / N)."""
    _, scale, time = _score_sde_coordinates(config)
    denoiser = pretrained.denoiser()
    return lambda x, t: scale * denoiser.score(scale * jnp.asarray(x, jnp.float32) - (scale - 1.0), time(t))


def score_sde_network_fn(pretrained, config: Any) -> Callable:
    """score_sde's network output at `get_score_fn`'s labels for its (x, t): the score for VE (its
    NCSNpp divides by sigma itself), the eps prediction for VP and sub-VP."""
    cfg, scale, time = _score_sde_coordinates(config)
    if cfg["training"]["sde"].lower() == "vesde":
        return score_sde_score_fn(pretrained, config)
    network = pretrained.network()
    return lambda x, t: network(scale * jnp.asarray(x, jnp.float32) - (scale - 1.0), time(t))


__all__ = [
    "CONFIG_FIELDS",
    "SCORE_SDE_CONFIGS",
    "WEIGHTS",
    "from_score_sde",
    "is_score_sde_checkpoint",
    "latest_score_sde_checkpoint",
    "read_score_sde_params",
    "score_sde_config",
    "score_sde_network_fn",
    "score_sde_score_fn",
]

"""Published checkpoints in: `load_pretrained(path)` reads a checkpoint of a reference implementation
and returns our model with those weights, the process and the prediction it was trained with.

Formats (inferred from the file's content, not its name):

- "dit": facebookresearch/DiT `.pt` (a state dict, or a training checkpoint with "ema"/"model");
  linear betas 1e-4..0.02 over 1000 steps, eps prediction, learned sigma when the output has 2C
  channels.
- "adm": openai/guided-diffusion and improved-diffusion `UNetModel` `.pt` (state dict). The file
  holds no schedule, image size or head count: pass `image_size`, `noise_schedule` ("linear" or
  "cosine"), `diffusion_steps`, `num_heads` / `num_head_channels`, `attention_order`.
- "edm": NVlabs/edm `SongUNet` (DDPM++ and NCSN++) or `DhariwalUNet` (ADM; option
  `num_head_channels`, 64 by default), conditional or not, as a state dict saved with
  `torch.save(net.state_dict())` or as safetensors. Keys may carry EDMPrecond's "model." prefix.
  Returned with the EDM process and `EDMPreconditioned(sigma_data)` (a state dict does not say
  which wrapper it was trained in).
- "edm-pkl": NVlabs/edm's network-snapshot-*.pkl (its "ema"), read by `load_module_pickle` without
  torch and without the source code the pickle carries; the wrapper gives process and prediction:
  EDMPrecond as above, VPPrecond the VP SDE (beta_min, beta_min + beta_d) with eps and network time
  (M - 1) t, VEPrecond the VE SDE (sigma_min, sigma_max) with eps, network time log(sigma / 2) and
  `output_sign=-1` (its F is -eps). NVlabs/edm2's snapshots (its `Precond`) load by the same
  reader as `EDM2UNet` with `EDMPreconditioned(sigma_data)`; the architecture is read from the
  modules' attributes and shapes, the log-variance head comes with the parameters.
- "diffusers-unet": a diffusers `UNet2DModel` folder (or a pipeline folder with unet/), DDPM's
  U-Net as our ADM U-Net; the scheduler config beside it (scheduler_config.json, or
  ../scheduler/) gives the DDPM chain (`diffusers_betas`) and the prediction (epsilon, v_prediction,
  sample); diffusers' DDPMScheduler defaults when there is none.
- "diffusers-vae": a diffusers folder of `AutoencoderKL` (Stable Diffusion's VAE), returned as a
  `PretrainedAutoencoder` (the `AutoencoderKL` model with its scaling factor).
- "diffusers-dit": a diffusers folder (config.json + diffusion_pytorch_model.safetensors or .bin) of
  `DiTTransformer2DModel`; loaded with `frequency_shift=1` and `mlp_norm_eps=1e-5` (diffusers'
  settings), the time embedding of the first block (diffusers stores one per block).
- "score-sde": yang-song/score_sde's Flax msgpack checkpoints of its NCSN++ / DDPM++ (`ncsnpp`
  model), read by `diffjax.models.score_sde_checkpoint` (see there for the configs covered and how
  its conventions map to ours); option `config` (a score_sde config name or its config) is
  required, `weights` "ema" (default) or "target". VE configs come as `VE(2 sigma_min, 2 sigma_max)`
  on [-1, 1] data (`VE(sigma_min, sigma_max)` when the config's data are centered) with eps
  prediction and `output_sign=-1`, VP / sub-VP with eps and time 999 t. A folder of
  `checkpoint_<step>` files gives its newest.

Torch files are read without torch (`diffjax.models.torch_files`), safetensors with numpy. A
network input convention is part of the result: DDPM chains embed the integer step j = N t - 1 of
the discrete process at t = (j + 1) / N; EDM networks see c_noise = log(sigma) / 4.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import traversals

from diffjax.denoisers import Denoiser, EDMPreconditioned, LearnedVarianceDenoiser
from diffjax.models.api import build, functional, get_config, logical_partition_specs
from diffjax.models.autoencoder import AutoencoderConfig, AutoencoderKL
from diffjax.models.configs import ModelConfig
from diffjax.models.edm2 import params_from_edm2_state
from diffjax.models.score_sde_checkpoint import from_score_sde, is_score_sde_checkpoint
from diffjax.models.torch_files import (
    PickledObject,
    is_module_pickle,
    is_safetensors,
    load_module_pickle,
    load_torch_object,
    read_safetensors,
)
from diffjax.processes import EDM, VE, VP, DiscreteVP, GaussianProcess

Placement = Callable[[jax.sharding.PartitionSpec, tuple], jax.sharding.Sharding]
FORMATS = ("dit", "adm", "edm", "edm-pkl", "diffusers-dit", "diffusers-unet", "diffusers-vae", "score-sde")
_DIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}  # DiT-S, B, L, XL


@dataclasses.dataclass(frozen=True, eq=False)
class Pretrained:
    """A loaded checkpoint: the model (weights set), its process and prediction.

    `network(y=None)` is `fn(x, t)` in the process's time returning the prediction (the first C
    channels when the variance is learned); `variance_network(y=None)` returns (prediction, v) for a
    learned-variance model; `denoiser(y=None)` wraps `network` in a `Denoiser`. `apply` / `params`
    are the functional view of `model` (the raw network, called with the network's own time input).
    `output_sign` is -1 where the raw network predicts -eps (EDM's VEPrecond: D = x + sigma F).
    """

    model: nnx.Module
    config: ModelConfig
    process: GaussianProcess
    prediction: Any
    format: str
    learned_variance: bool
    time_input: Callable[[jax.Array], jax.Array]
    apply: Callable
    params: dict
    output_sign: float = 1.0

    def _raw(self, params, y):
        params = self.params if params is None else params
        if self.output_sign == 1.0:
            return lambda x, t: self.apply(params, x, self.time_input(t), y)
        return lambda x, t: self.output_sign * self.apply(params, x, self.time_input(t), y)

    def network(self, y=None, params=None) -> Callable:
        raw, c = self._raw(params, y), self.config.in_channels
        return (lambda x, t: raw(x, t)[..., :c]) if self.learned_variance else raw

    def variance_network(self, y=None, params=None) -> Callable:
        if not self.learned_variance:
            raise ValueError(f"this {self.format} checkpoint has no learned variance (output has C channels)")
        raw, c = self._raw(params, y), self.config.in_channels

        def fn(x, t):
            out = raw(x, t)
            return out[..., :c], out[..., c:]

        return fn

    def denoiser(self, y=None, params=None) -> Denoiser:
        """A `Denoiser`; for a learned-variance model a `LearnedVarianceDenoiser` (for
        `LearnedVarianceAncestral`; every other solver uses the prediction alone)."""
        if self.learned_variance:
            return LearnedVarianceDenoiser(self._raw(params, y), self.process, self.prediction)
        return Denoiser(self.network(y, params), self.process, self.prediction)


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def _release_freed_memory() -> None:
    """Hand the heap pages numpy has freed back to the OS (glibc's malloc_trim; a no-op elsewhere):
    glibc keeps freed arrays of a few MB on its heap, so a checkpoint converted tensor by tensor
    would otherwise stay resident twice (original and converted)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


# ----------------------------------------------------------------------------------------------
# Schedules of the DDPM-family checkpoints (improved DDPM, Nichol & Dhariwal 2021).
# ----------------------------------------------------------------------------------------------


def ddpm_betas(schedule: str, steps: int) -> np.ndarray:
    """guided-diffusion's `get_named_beta_schedule`: "linear" (1e-4..0.02 scaled by 1000 / steps) or
    "cosine" (alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2), betas clipped at 0.999)."""
    if schedule == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    if schedule == "cosine":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)])
    raise ValueError(f"noise_schedule={schedule!r} is invalid: one of ('linear', 'cosine')")


def _step_index(steps: int) -> Callable:
    return lambda t: jnp.asarray(t, jnp.float32) * steps - 1.0


# ----------------------------------------------------------------------------------------------
# Reading the files
# ----------------------------------------------------------------------------------------------


def _state_dict(path: Path) -> dict[str, np.ndarray]:
    if is_safetensors(path):
        return read_safetensors(path)
    obj = load_torch_object(path)
    if isinstance(obj, dict):
        for key in ("ema", "state_dict", "model"):
            if isinstance(obj.get(key), dict) and any(isinstance(v, np.ndarray) for v in obj[key].values()):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ValueError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict")
    flat = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    for prefix in ("module.", "_orig_mod."):
        if flat and all(k.startswith(prefix) for k in flat):
            flat = {k[len(prefix) :]: v for k, v in flat.items()}
    return flat


def _detect(sd: dict[str, np.ndarray]) -> str:
    if "x_embedder.proj.weight" in sd:
        return "dit"
    if "input_blocks.0.0.weight" in sd:
        return "adm"
    keys = {k.removeprefix("model.") for k in sd}
    if "map_layer0.weight" in keys and any(k.startswith("dec.") and "_aux_conv" in k for k in keys):
        return "edm"
    if "map_layer0.weight" in keys and "out_conv.weight" in keys:
        return "edm"
    return ""


def load_pretrained(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    param_dtype: str = "float32",
    dtype: str = "float32",
    placement: Placement | None = None,
    **options,
) -> Pretrained | PretrainedAutoencoder:
    """Load a published checkpoint (see the module docstring for the formats and their options).

    The format is inferred from the content; `format=` forces one of FORMATS. Parameters are stored
    in `param_dtype` ("float32" or "bfloat16") and computed in `dtype`. `placement(logical_spec,
    shape) -> Sharding` puts each parameter where it belongs as soon as it is converted, e.g.
    `diffjax.training.sharding.placement(mesh, rules)` for the trainer's shardings (FSDP, tensor
    parallel): no device holds a whole sharded parameter. None: the default device.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {str(path)!r}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"format={format!r} is invalid: one of {FORMATS} (or None to infer it)")
    if format == "score-sde" or (format is None and is_score_sde_checkpoint(path)):
        return _finish(*from_score_sde(path, options), param_dtype, dtype, placement, "score-sde", path)
    if path.is_dir():
        if (path / "model_index.json").is_file() and (path / "unet" / "config.json").is_file():
            path = path / "unet"  # a pipeline folder: its denoising network
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ValueError(f"{str(path)!r} is a folder without config.json: not a diffusers model folder")
        config = json.loads(cfg_path.read_text())
        name = config.get("_class_name")
        if name == "AutoencoderKL":
            sd = _state_dict(_diffusers_weights(path))
            return _from_diffusers_vae(sd, config, options, param_dtype, dtype, placement, path)
        if name not in ("DiTTransformer2DModel", "UNet2DModel"):
            raise ValueError(
                f"{str(path)!r}: diffusers class {name!r} is not supported; known: DiTTransformer2DModel, "
                f"UNet2DModel, AutoencoderKL (formats {FORMATS})"
            )
        sd = _state_dict(_diffusers_weights(path))
        if name == "UNet2DModel":
            converted = _from_diffusers_unet(sd, config, _diffusers_scheduler(path), options, path)
            return _finish(*converted, param_dtype, dtype, placement, "diffusers-unet", path)
        return _finish(*_from_diffusers_dit(sd, config, options), param_dtype, dtype, placement, "diffusers-dit", path)
    if format == "edm-pkl" or (format is None and not is_safetensors(path) and is_module_pickle(path)):
        return _finish(*_from_edm_pickle(path, options), param_dtype, dtype, placement, "edm-pkl", path)
    sd = _state_dict(path)
    kind = format or _detect(sd)
    if kind not in ("dit", "adm", "edm"):
        some = ", ".join(sorted(sd)[:5])
        raise ValueError(
            f"{str(path)!r}: could not tell the checkpoint's format from its keys ({some}, ...); "
            f"known formats: {FORMATS}"
        )
    convert = {"dit": _from_dit, "adm": _from_adm, "edm": _from_edm}[kind]
    converted = convert(sd, options)
    del sd  # the originals of the arrays the conversion copied
    return _finish(*converted, param_dtype, dtype, placement, kind, path)


def _diffusers_weights(folder: Path) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"{str(folder)!r} has no diffusion_pytorch_model.safetensors or .bin")


def _finish(config_name, overrides, params, extras, options, param_dtype, dtype, placement, kind, path) -> Pretrained:
    unknown = sorted(set(options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for format {kind!r}")
    cfg = get_config(config_name, **overrides, param_dtype=param_dtype, dtype=dtype)
    model = nnx.eval_shape(lambda: build(cfg))
    _set_params(model, params, placement, path, kind)
    apply, params = functional(model)
    return Pretrained(model=model, config=cfg, apply=apply, params=params, format=kind, **extras)


# ----------------------------------------------------------------------------------------------
# Layout helpers: torch (out, in[, kh, kw]) -> ours (in, out) / HWIO.
# ----------------------------------------------------------------------------------------------


def _linear(sd, name) -> dict:
    out = {"kernel": np.ascontiguousarray(sd[f"{name}.weight"].T)}
    if f"{name}.bias" in sd:
        out["bias"] = sd[f"{name}.bias"]
    return out


def _conv(sd, name) -> dict:
    w = sd[f"{name}.weight"]
    if w.ndim == 3:  # Conv1d 1x1 (guided-diffusion attention)
        w = w[..., None]
    out = {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0))}
    if f"{name}.bias" in sd:
        out["bias"] = sd[f"{name}.bias"]
    return out


def _norm(sd, name) -> dict:
    return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}


# Residual blocks: (GroupNorm, conv, [time embedding], GroupNorm, conv, [1x1 or 3x3 skip]) under
# each format's names for our norm0 / conv0 / temb / norm1 / conv1 / skip.
_RESBLOCK_NAMES = {
    "adm": ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3", "skip_connection"),
    "diffusers": ("norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut"),
    "vae": ("norm1", "conv1", None, "norm2", "conv2", "conv_shortcut"),
    "edm": ("norm0", "conv0", "affine", "norm1", "conv1", "skip"),
}


def _resblock(sd, name: str, kind: str) -> dict:
    norm0, conv0, temb, norm1, conv1, skip = _RESBLOCK_NAMES[kind]
    out = {
        "norm0": _norm(sd, f"{name}.{norm0}"),
        "conv0": _conv(sd, f"{name}.{conv0}"),
        "norm1": _norm(sd, f"{name}.{norm1}"),
        "conv1": _conv(sd, f"{name}.{conv1}"),
    }
    if temb is not None:
        out["temb"] = _linear(sd, f"{name}.{temb}")
    if f"{name}.{skip}.weight" in sd:
        out["skip"] = _conv(sd, f"{name}.{skip}")
    return out


def _class_table(table: np.ndarray, num_classes: int) -> np.ndarray:
    """A (num_classes [+ 1], D) table as ours with a null row (zeros where the reference has none)."""
    if table.shape[0] == num_classes:
        table = np.concatenate([table, np.zeros_like(table[:1])])
    return table


def _require(sd: dict, keys, kind: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(f"not a {kind} state dict: missing {missing[:5]}")


# ----------------------------------------------------------------------------------------------
# DiT (facebookresearch/DiT) and diffusers' DiTTransformer2DModel
# ----------------------------------------------------------------------------------------------


def _dit_qkv(w: np.ndarray, b: np.ndarray, heads: int) -> dict:
    d = w.shape[1]
    return {"kernel": np.ascontiguousarray(w.T).reshape(d, 3, heads, d // heads), "bias": b.reshape(3, heads, -1)}


def _dit_out(w: np.ndarray, b: np.ndarray, heads: int) -> dict:
    d = w.shape[0]
    return {"kernel": np.ascontiguousarray(w.T).reshape(heads, d // heads, d), "bias": b}


def _stack(blocks: list[dict]) -> dict:
    """Per-block parameter trees stacked leaf by leaf; the blocks are emptied on the way, so that a
    large checkpoint is not held twice."""

    def take(tree, path):
        for k in path[:-1]:
            tree = tree[k]
        return tree.pop(path[-1])

    stacked = {}
    for p in traversals.flatten_mapping(blocks[0]):
        stacked[p] = np.stack([take(b, p) for b in blocks])
        _release_freed_memory()
    return traversals.unflatten_mapping(stacked)


def _dit_overrides(hidden, c_in, p, depth, c_out, num_classes, image_size, mlp_hidden, options) -> dict:
    heads = options.pop("num_heads", _DIT_HEADS.get(hidden))
    if heads is None:
        raise ValueError(f"hidden size {hidden} is not a published DiT size: pass num_heads=")
    if c_out not in (c_in, 2 * c_in):
        raise ValueError(f"DiT output has {c_out} channels; expected {c_in} or {2 * c_in} (learned sigma)")
    return dict(
        image_size=image_size,
        in_channels=c_in,
        patch_size=p,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_hidden / hidden,
        num_classes=num_classes,
        learn_sigma=c_out == 2 * c_in,
        time_scale=1.0,
    )


def _ddpm_extras(options, learned: bool, steps_default: int = 1000, schedule_default: str = "linear") -> dict:
    steps = options.pop("diffusion_steps", steps_default)
    schedule = options.pop("noise_schedule", schedule_default)
    return dict(
        process=DiscreteVP.from_betas(ddpm_betas(schedule, steps)),
        prediction="eps",
        learned_variance=learned,
        time_input=_step_index(steps),
    )


def _dit_block(sd, b: str, heads: int, qkv: tuple, out: str, fc1: str, fc2: str, modulation: str) -> dict:
    """One DiT block's params: qkv = the fused (weight, bias), the rest named under prefix b."""
    return {
        "attn": {"qkv": _dit_qkv(*qkv, heads), "out": _dit_out(sd[f"{b}{out}.weight"], sd[f"{b}{out}.bias"], heads)},
        "fc1": _linear(sd, b + fc1),
        "fc2": _linear(sd, b + fc2),
        "modulation": _linear(sd, b + modulation),
    }


def _dit_params(sd, blocks, table, patch, time0, time1, final_modulation, final_linear) -> dict:
    return {
        "patch_embed": _conv(sd, patch),
        "time0": _linear(sd, time0),
        "time1": _linear(sd, time1),
        "class_embed": {"table": table},
        "blocks": _stack(blocks),
        "final_modulation": _linear(sd, final_modulation),
        "final_linear": _linear(sd, final_linear),
    }


def _from_dit(sd, options):
    _require(sd, ["x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.embedding_table.weight"], "DiT")
    w = sd["x_embedder.proj.weight"]
    hidden, c_in, p = w.shape[0], w.shape[1], w.shape[2]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    c_out = sd["final_layer.linear.weight"].shape[0] // (p * p)
    if "pos_embed" not in sd and "image_size" not in options:
        raise ValueError("DiT state dict without pos_embed: pass image_size=")
    default_size = int(round(math.sqrt(sd["pos_embed"].shape[1]))) * p if "pos_embed" in sd else None
    image_size = options.pop("image_size", default_size)
    table = sd["y_embedder.embedding_table.weight"]
    num_classes = options.pop("num_classes", table.shape[0] - 1)
    mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    ov = _dit_overrides(hidden, c_in, p, depth, c_out, num_classes, image_size, mlp_hidden, options)
    heads = ov["num_heads"]
    blocks = []
    for i in range(depth):
        b = f"blocks.{i}."
        if i:  # the previous block's tensors are converted: drop them (a large checkpoint is not held twice)
            for k in [k for k in sd if k.startswith(f"blocks.{i - 1}.")]:
                del sd[k]
        qkv = (sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        blocks.append(_dit_block(sd, b, heads, qkv, "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"))
    names = ("x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.adaLN_modulation.1")
    params = _dit_params(sd, blocks, _class_table(table, num_classes), *names, "final_layer.linear")
    return "DiT-S/2", ov, params, _ddpm_extras(options, ov["learn_sigma"]), options


def _from_diffusers_dit(sd, config, options):
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise ValueError(f"diffusers DiT with norm_type {config.get('norm_type')!r} is not supported")
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    hidden, p, c_in = heads * head_dim, config["patch_size"], config["in_channels"]
    c_out = config.get("out_channels") or c_in
    depth = config["num_layers"]
    num_classes = config.get("num_embeds_ada_norm") or 1000
    mlp_hidden = sd["transformer_blocks.0.ff.net.0.proj.weight"].shape[0]
    options.setdefault("num_heads", heads)
    ov = _dit_overrides(hidden, c_in, p, depth, c_out, num_classes, config["sample_size"], mlp_hidden, options)
    ov.update(frequency_shift=1, mlp_norm_eps=float(config.get("norm_eps", 1e-5)))
    emb = "transformer_blocks.0.norm1.emb."
    for i in range(1, depth):
        for k in ("timestep_embedder.linear_1.weight", "class_embedder.embedding_table.weight"):
            other = sd[f"transformer_blocks.{i}.norm1.emb.{k}"]
            if not np.array_equal(other, sd[emb + k]):
                raise ValueError(
                    f"diffusers DiT block {i} has its own {k}; one shared time/label embedding is supported"
                )
    blocks = []
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        qkv_w = np.concatenate([sd[b + f"attn1.to_{n}.weight"] for n in "qkv"])
        qkv_b = np.concatenate([sd[b + f"attn1.to_{n}.bias"] for n in "qkv"])
        blocks.append(
            _dit_block(sd, b, heads, (qkv_w, qkv_b), "attn1.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear")
        )
    table = _class_table(sd[emb + "class_embedder.embedding_table.weight"], num_classes)
    times = (emb + "timestep_embedder.linear_1", emb + "timestep_embedder.linear_2")
    params = _dit_params(sd, blocks, table, "pos_embed.proj", *times, "proj_out_1", "proj_out_2")
    return "DiT-S/2", ov, params, _ddpm_extras(options, ov["learn_sigma"]), options


# ----------------------------------------------------------------------------------------------
# diffusers UNet2DModel (DDPM's U-Net, e.g. google/ddpm-cifar10-32) and its DDPMScheduler
# ----------------------------------------------------------------------------------------------

_PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _diffusers_scheduler(unet_folder: Path) -> dict:
    """The scheduler config beside a UNet2DModel: <folder>/scheduler_config.json (single-model
    repositories such as google/ddpm-cifar10-32) or ../scheduler/ (pipeline folders); {} (diffusers'
    DDPMScheduler defaults) when there is none."""
    for candidate in (
        unet_folder / "scheduler_config.json",
        unet_folder.parent / "scheduler" / "scheduler_config.json",
    ):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return {}


def diffusers_betas(scheduler: dict) -> np.ndarray:
    """The betas of a diffusers DDPM-family scheduler config: "linear" (beta_start..beta_end),
    "scaled_linear" (the square of a linear ramp of square roots), "squaredcos_cap_v2" (improved
    DDPM's cosine schedule) or `trained_betas`."""
    steps = int(scheduler.get("num_train_timesteps", 1000))
    start, end = float(scheduler.get("beta_start", 1e-4)), float(scheduler.get("beta_end", 0.02))
    if scheduler.get("rescale_betas_zero_snr"):
        raise ValueError("schedulers with rescale_betas_zero_snr (alpha_bar = 0 at the last step) are not supported")
    if scheduler.get("trained_betas") is not None:
        return np.asarray(scheduler["trained_betas"], np.float64)
    kind = scheduler.get("beta_schedule", "linear")
    if kind == "linear":
        return np.linspace(start, end, steps, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, steps, dtype=np.float64) ** 2
    if kind == "squaredcos_cap_v2":
        return ddpm_betas("cosine", steps)
    raise ValueError(
        f"beta_schedule={kind!r} is not supported: one of ('linear', 'scaled_linear', 'squaredcos_cap_v2')"
    )


def _diffusers_attention(sd, name, heads: int) -> dict:
    w = np.stack([sd[f"{name}.to_{n}.weight"].T for n in "qkv"], axis=1)  # (C, 3, C)
    c = w.shape[0]
    b = np.stack([sd[f"{name}.to_{n}.bias"] for n in "qkv"])
    return {
        "norm": _norm(sd, f"{name}.group_norm"),
        "attn": {
            "qkv": {
                "kernel": np.ascontiguousarray(w.reshape(c, 3, heads, c // heads)),
                "bias": b.reshape(3, heads, -1),
            },
            "out": {
                "kernel": np.ascontiguousarray(sd[f"{name}.to_out.0.weight"].T).reshape(heads, c // heads, c),
                "bias": sd[f"{name}.to_out.0.bias"],
            },
        },
    }


def _check_diffusers_unet(config: dict, path: Path) -> None:
    """Refuse the UNet2DModel options our ADM U-Net does not have."""
    expected = dict(
        act_fn="silu",
        time_embedding_type="positional",
        center_input_sample=False,
        class_embed_type=None,
        mid_block_scale_factor=1,
        add_attention=True,
        downsample_type="conv",
        upsample_type="conv",
        attn_norm_num_groups=None,
        mid_block_type="UNetMidBlock2D",
        time_embedding_dim=None,
    )
    for key, want in expected.items():
        if key in config and config[key] != want:
            raise ValueError(f"{str(path)!r}: UNet2DModel with {key}={config[key]!r} is not supported (only {want!r})")
    downs, ups = list(config["down_block_types"]), list(config["up_block_types"])
    plain = {"DownBlock2D": False, "AttnDownBlock2D": True, "UpBlock2D": False, "AttnUpBlock2D": True}
    for kind in downs + ups:
        if kind not in plain:
            raise ValueError(f"{str(path)!r}: UNet2DModel block {kind!r} is not supported (one of {tuple(plain)})")
    if [plain[k] for k in downs] != [plain[k] for k in reversed(ups)]:
        raise ValueError(f"{str(path)!r}: attention at different levels on the way down {downs} and up {ups}")
    if config.get("resnet_time_scale_shift", "default") not in ("default", "scale_shift"):
        raise ValueError(
            f"{str(path)!r}: resnet_time_scale_shift={config['resnet_time_scale_shift']!r} is not supported"
        )


def _from_diffusers_unet(sd, config, scheduler, options, path):
    """diffusers' UNet2DModel as our ADM U-Net: the DDPM structure (attention after every block of a
    level), with its GroupNorm eps, downsample padding and time frequencies; the scheduler config
    gives the DDPM chain and the prediction."""
    _check_diffusers_unet(config, path)
    chans = tuple(int(c) for c in config["block_out_channels"])
    mc, nlev, lpb = chans[0], len(chans), int(config["layers_per_block"])
    if any(c % mc for c in chans):
        raise ValueError(f"{str(path)!r}: block_out_channels {chans} are not multiples of the first")
    c_in, c_out = int(config["in_channels"]), int(config["out_channels"])
    if c_out not in (c_in, 2 * c_in):
        raise ValueError(f"{str(path)!r}: {c_out} output channels for {c_in} input channels is not supported")
    size = config["sample_size"]
    size = int(size if isinstance(size, int) else size[0])
    head_dim = config.get("attention_head_dim")
    num_classes = int(config.get("num_class_embeds") or 0)
    ov = dict(
        image_size=size,
        in_channels=c_in,
        model_channels=mc,
        channel_mult=tuple(c // mc for c in chans),
        num_res_blocks=lpb,
        attn_resolutions=tuple(size // 2**i for i, k in enumerate(config["down_block_types"]) if k.startswith("Attn")),
        num_heads=1,
        num_head_channels=int(head_dim) if head_dim else -1,
        resblock_updown=False,
        use_scale_shift_norm=config.get("resnet_time_scale_shift", "default") == "scale_shift",
        conv_resample=True,
        num_classes=num_classes,
        learn_sigma=c_out == 2 * c_in,
        norm_groups=int(config.get("norm_num_groups", 32)),
        norm_eps=float(config.get("norm_eps", 1e-5)),
        downsample_pad=(1, 1) if int(config.get("downsample_padding", 1)) else (0, 1),
        frequency_shift=int(config.get("freq_shift", 0)),
        dropout=0.0,
        time_scale=1.0,
    )
    heads_of = lambda ch: ch // int(head_dim) if head_dim else 1  # noqa: E731
    temb0 = _linear(sd, "time_embedding.linear_1")
    if not config.get("flip_sin_to_cos", True):  # features [sin, cos]; ours are [cos, sin]
        half = mc // 2
        temb0["kernel"] = np.concatenate([temb0["kernel"][half : 2 * half], temb0["kernel"][:half]])
    params: dict = {
        "conv_in": _conv(sd, "conv_in"),
        "temb0": temb0,
        "temb1": _linear(sd, "time_embedding.linear_2"),
        "norm_out": _norm(sd, "conv_norm_out"),
        "conv_out": _conv(sd, "conv_out"),
        "mid_block0": _resblock(sd, "mid_block.resnets.0", "diffusers"),
        "mid_attn": _diffusers_attention(sd, "mid_block.attentions.0", heads_of(chans[-1])),
        "mid_block1": _resblock(sd, "mid_block.resnets.1", "diffusers"),
        "down": {},
        "up": {},
    }
    if num_classes:
        params["class_embed"] = {"table": _class_table(sd["class_embedding.weight"], num_classes)}
    for i in range(nlev):
        d, u = f"down_blocks.{i}", f"up_blocks.{nlev - 1 - i}"
        for j in range(lpb):
            params["down"][f"level{i}_block{j}"] = _resblock(sd, f"{d}.resnets.{j}", "diffusers")
            if f"{d}.attentions.{j}.to_q.weight" in sd:
                params["down"][f"level{i}_attn{j}"] = _diffusers_attention(
                    sd, f"{d}.attentions.{j}", heads_of(chans[i])
                )
        for j in range(lpb + 1):
            params["up"][f"level{i}_block{j}"] = _resblock(sd, f"{u}.resnets.{j}", "diffusers")
            if f"{u}.attentions.{j}.to_q.weight" in sd:
                params["up"][f"level{i}_attn{j}"] = _diffusers_attention(sd, f"{u}.attentions.{j}", heads_of(chans[i]))
        if i != nlev - 1:
            params["down"][f"level{i}_down"] = {"conv": _conv(sd, f"{d}.downsamplers.0.conv")}
        if i != 0:
            params["up"][f"level{i}_up"] = {"conv": _conv(sd, f"{u}.upsamplers.0.conv")}
    prediction_type = scheduler.get("prediction_type", "epsilon")
    if prediction_type not in _PREDICTION_TYPES:
        raise ValueError(f"{str(path)!r}: prediction_type={prediction_type!r} is not one of {tuple(_PREDICTION_TYPES)}")
    betas = diffusers_betas(scheduler)
    extras = dict(
        process=DiscreteVP.from_betas(betas),
        prediction=_PREDICTION_TYPES[prediction_type],
        learned_variance=ov["learn_sigma"],
        time_input=_step_index(len(betas)),
    )
    return "ADM-cifar10", ov, params, extras, options


# ----------------------------------------------------------------------------------------------
# ADM (openai/guided-diffusion, improved-diffusion)
# ----------------------------------------------------------------------------------------------


def _submodules(sd, prefix: str) -> dict[int, dict[int, set]]:
    """{block index: {submodule index: set of key remainders}} under `prefix` (input_blocks, ...)."""
    out: dict[int, dict[int, set]] = {}
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(\d+)\.(.+)$")
    for k in sd:
        m = pat.match(k)
        if m:
            out.setdefault(int(m.group(1)), {}).setdefault(int(m.group(2)), set()).add(m.group(3))
    return out


def _is_attention(keys: set) -> bool:
    return "qkv.weight" in keys


def _adm_attention(sd, name, heads: int, order: str) -> dict:
    w = sd[f"{name}.qkv.weight"][..., 0]  # (3C, C)
    b = sd[f"{name}.qkv.bias"]
    c = w.shape[1]
    hd = c // heads
    if order == "legacy":  # QKVAttentionLegacy: per head [q, k, v]
        w4, b3 = w.reshape(heads, 3, hd, c), b.reshape(heads, 3, hd)
        kernel, bias = w4.transpose(3, 1, 0, 2), b3.transpose(1, 0, 2)
    elif order == "new":  # QKVAttention: [q (all heads), k, v]
        w4, b3 = w.reshape(3, heads, hd, c), b.reshape(3, heads, hd)
        kernel, bias = w4.transpose(3, 0, 1, 2), b3
    else:
        raise ValueError(f"attention_order={order!r} is invalid: one of ('legacy', 'new')")
    pw = sd[f"{name}.proj_out.weight"][..., 0]  # (C, C)
    return {
        "norm": _norm(sd, f"{name}.norm"),
        "attn": {
            "qkv": {"kernel": np.ascontiguousarray(kernel), "bias": np.ascontiguousarray(bias)},
            "out": {"kernel": np.ascontiguousarray(pw.T).reshape(heads, hd, c), "bias": sd[f"{name}.proj_out.bias"]},
        },
    }


def _from_adm(sd, options):
    _require(sd, ["input_blocks.0.0.weight", "out.2.weight", "time_embed.0.weight"], "guided-diffusion UNetModel")
    if "image_size" not in options:
        raise ValueError("guided-diffusion checkpoints do not record the image size: pass image_size=")
    image_size = options.pop("image_size")
    mc, c_in = sd["input_blocks.0.0.weight"].shape[:2]
    c_out = sd["out.2.weight"].shape[0]
    inputs, outputs = _submodules(sd, "input_blocks"), _submodules(sd, "output_blocks")
    # The first output block with an upsampler (a submodule that is neither the ResBlock nor
    # attention) closes the deepest level: its index is num_res_blocks.
    ups = [k for k in sorted(outputs) if any(j > 0 and not _is_attention(v) for j, v in outputs[k].items())]
    nrb = ups[0] if ups else len(outputs) - 1
    nlev = len(outputs) // (nrb + 1)
    mult = tuple(
        int(sd[f"output_blocks.{(nlev - 1 - i) * (nrb + 1)}.0.out_layers.3.weight"].shape[0] // mc) for i in range(nlev)
    )
    attn_res, k = [], 1
    for level in range(nlev):
        for _ in range(nrb):
            if 1 in inputs[k] and _is_attention(inputs[k][1]):
                attn_res.append(image_size // 2**level)
            k += 1
        k += level != nlev - 1
    emb_out = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]
    first_out = sd["input_blocks.1.0.out_layers.3.weight"].shape[0]
    has_down_conv = any("op.weight" in v.get(0, set()) for v in inputs.values())
    num_classes = sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else 0
    order = options.pop("attention_order", "legacy")
    ov = dict(
        image_size=image_size,
        in_channels=c_in,
        model_channels=mc,
        channel_mult=mult,
        num_res_blocks=nrb,
        attn_resolutions=tuple(sorted(set(attn_res), reverse=True)),
        num_heads=options.pop("num_heads", 1),
        num_head_channels=options.pop("num_head_channels", -1),
        resblock_updown=nlev > 1 and not has_down_conv,
        use_scale_shift_norm=emb_out == 2 * first_out,
        conv_resample=True,
        num_classes=num_classes,
        learn_sigma=c_out == 2 * c_in,
        norm_groups=32,
        dropout=0.0,
        time_scale=1.0,
    )
    cfg = get_config("ADM-cifar10", **ov)
    heads_of = lambda ch: ch // cfg.num_head_channels if cfg.num_head_channels != -1 else cfg.num_heads  # noqa: E731
    probe = nnx.eval_shape(lambda: build(cfg))
    params: dict = {
        "conv_in": _conv(sd, "input_blocks.0.0"),
        "temb0": _linear(sd, "time_embed.0"),
        "temb1": _linear(sd, "time_embed.2"),
        "norm_out": _norm(sd, "out.0"),
        "conv_out": _conv(sd, "out.2"),
        "down": {},
        "up": {},
        "mid_block0": _resblock(sd, "middle_block.0", "adm"),
        "mid_attn": _adm_attention(sd, "middle_block.1", heads_of(sd["middle_block.1.norm.weight"].shape[0]), order),
        "mid_block1": _resblock(sd, "middle_block.2", "adm"),
    }
    if num_classes:
        params["class_embed"] = {"table": _class_table(sd["label_emb.weight"], num_classes)}
    k = 0
    for name in probe.down_order:
        if "_attn" in name:
            base = f"input_blocks.{k}.1"
            params["down"][name] = _adm_attention(sd, base, heads_of(sd[f"{base}.norm.weight"].shape[0]), order)
            continue
        k += 1
        base = f"input_blocks.{k}.0"
        params["down"][name] = (
            {"conv": _conv(sd, f"{base}.op")} if f"{base}.op.weight" in sd else _resblock(sd, base, "adm")
        )
    k, sub = -1, 0
    for name in probe.up_order:
        if "_block" in name:
            k, sub = k + 1, 0
            params["up"][name] = _resblock(sd, f"output_blocks.{k}.0", "adm")
        elif "_attn" in name:
            sub += 1
            base = f"output_blocks.{k}.{sub}"
            params["up"][name] = _adm_attention(sd, base, heads_of(sd[f"{base}.norm.weight"].shape[0]), order)
        else:
            sub += 1
            base = f"output_blocks.{k}.{sub}"
            params["up"][name] = (
                {"conv": _conv(sd, f"{base}.conv")} if f"{base}.conv.weight" in sd else _resblock(sd, base, "adm")
            )
    extras = _ddpm_extras(options, ov["learn_sigma"])
    return "ADM-cifar10", ov, params, extras, options


# ----------------------------------------------------------------------------------------------
# EDM (NVlabs/edm SongUNet: DDPM++ and NCSN++)
# ----------------------------------------------------------------------------------------------


def _edm_block(sd, name) -> tuple[dict, dict | None]:
    block = _resblock(sd, name, "edm")
    attn = None
    if f"{name}.qkv.weight" in sd:
        w = sd[f"{name}.qkv.weight"][:, :, 0, 0]  # (3C, C): channel o = c * 3 + k (one head)
        b = sd[f"{name}.qkv.bias"]
        c = w.shape[1]
        attn = {
            "norm": _norm(sd, f"{name}.norm2"),
            "attn": {
                "qkv": {
                    "kernel": np.ascontiguousarray(w.reshape(c, 3, c).transpose(2, 1, 0)[:, :, None, :]),
                    "bias": np.ascontiguousarray(b.reshape(c, 3).T[:, None, :]),
                },
                "out": {
                    "kernel": np.ascontiguousarray(sd[f"{name}.proj.weight"][:, :, 0, 0].T)[None],
                    "bias": sd[f"{name}.proj.bias"],
                },
            },
        }
    return block, attn


def _from_edm(sd, options):
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    if "out_conv.weight" in sd:
        return _from_dhariwal_unet(sd, options)
    return _from_song_unet(sd, options)


def _edm_levels(sd, kind: str) -> tuple:
    """The level layout of an EDM U-Net state dict (SongUNet or DhariwalUNet): (resolution, model
    channels, input channels, level resolutions, blocks per level, channel multipliers, attention
    resolutions)."""
    conv_keys = [k for k in sd if re.match(r"^enc\.\d+x\d+_conv\.weight$", k)]
    if len(conv_keys) != 1:
        raise ValueError(f"not an EDM {kind} state dict: no unique enc.<res>x<res>_conv")
    res = int(conv_keys[0].split(".")[1].split("x")[0])
    mc, c_in = sd[conv_keys[0]].shape[:2]
    levels = sorted({int(m.group(1)) for k in sd for m in [re.match(r"^enc\.(\d+)x\d+_", k)] if m}, reverse=True)
    nrb = len({k.split(".")[1] for k in sd if re.match(rf"^enc\.{res}x{res}_block\d+\.", k)})
    mult = tuple(int(sd[f"enc.{r}x{r}_block0.conv0.weight"].shape[0] // mc) for r in levels)
    attn = tuple(r for r in levels if f"enc.{r}x{r}_block0.qkv.weight" in sd)
    return res, mc, c_in, levels, nrb, mult, attn


def _edm_extras(options: dict) -> dict:
    """What an EDM checkpoint is used with: the EDM process, EDM preconditioning with options'
    sigma_data (0.5 by default) and the raw c_noise as the network's time input."""
    sigma_data = options.pop("sigma_data", 0.5)
    return dict(
        process=EDM(),
        prediction=EDMPreconditioned(sigma_data),
        learned_variance=False,
        time_input=lambda c_noise: c_noise,
    )


def _from_song_unet(sd, options):
    _require(sd, ["map_layer0.weight", "map_layer1.weight"], "EDM SongUNet")
    res, mc, c_in, levels, nrb, mult, attn = _edm_levels(sd, "SongUNet")
    nlev = len(levels)
    fourier = "map_noise.freqs" in sd
    residual = any("_aux_residual" in k for k in sd)
    if any("_aux_skip" in k or "_aux_up" in k for k in sd):
        raise ValueError("EDM SongUNet with encoder/decoder type 'skip' is not supported")
    filters = [v for k, v in sd.items() if k.endswith("resample_filter")]
    fir_kernel = (1.0, 1.0)
    if filters:
        f2 = filters[0][0, 0].astype(np.float64)
        f1 = np.sqrt(np.diag(f2))
        fir_kernel = tuple(float(v) for v in f1 / f1.min())
    fir = len(fir_kernel) > 2
    num_classes = sd["map_label.weight"].shape[1] if "map_label.weight" in sd else 0
    c_out = sd[f"dec.{res}x{res}_aux_conv.weight"].shape[0]
    if c_out != c_in:
        raise ValueError(f"EDM SongUNet with {c_out} output channels for {c_in} input channels is not supported")
    if "map_augment.weight" in sd and options.pop("keep_augment", False):
        raise ValueError("augmentation labels (map_augment) are not supported")
    ov = dict(
        image_size=res,
        in_channels=c_in,
        nf=mc,
        ch_mult=mult,
        num_res_blocks=nrb,
        attn_resolutions=attn,
        num_classes=num_classes,
        fir=fir,
        fir_kernel=fir_kernel if fir else (1, 3, 3, 1),
        progressive_input="residual" if residual else "none",
        dropout=0.0,
    )
    preset = "NCSN++-cifar10-edm" if fourier else "DDPM++-cifar10-edm"
    if fourier != residual:
        ov["embedding_type"] = "fourier" if fourier else "positional"
    params: dict = {
        "conv_in": _conv(sd, f"enc.{res}x{res}_conv"),
        "temb0": _linear(sd, "map_layer0"),
        "temb1": _linear(sd, "map_layer1"),
        "down": {},
        "up": {},
    }
    if fourier:
        params["fourier"] = {"freqs": sd["map_noise.freqs"]}
    if num_classes:
        params["map_label"] = _linear(sd, "map_label")
    for i, r in enumerate(levels):
        p = f"enc.{r}x{r}_"
        if i > 0:
            params["down"][f"level{i - 1}_down"], _ = _edm_block(sd, p + "down")
            if residual:
                params["down"][f"level{i - 1}_pyramid"] = {"conv": _conv(sd, p + "aux_residual")}
        for j in range(nrb):
            params["down"][f"level{i}_block{j}"], a = _edm_block(sd, p + f"block{j}")
            if a is not None:
                params["down"][f"level{i}_attn{j}"] = a
    for i in reversed(range(nlev)):
        r = levels[i]
        p = f"dec.{r}x{r}_"
        if i == nlev - 1:
            params["mid_block0"], params["mid_attn"] = _edm_block(sd, p + "in0")
            params["mid_block1"], _ = _edm_block(sd, p + "in1")
        else:
            params["up"][f"level{i + 1}_up"], _ = _edm_block(sd, p + "up")
        for j in range(nrb + 1):
            params["up"][f"level{i}_block{j}"], a = _edm_block(sd, p + f"block{j}")
            if a is not None:
                params["up"][f"level{i}_attn"] = a
    params["norm_out"] = _norm(sd, f"dec.{res}x{res}_aux_norm")
    params["conv_out"] = _conv(sd, f"dec.{res}x{res}_aux_conv")
    extras = _edm_extras(options)
    return preset, ov, params, extras, options


def _dhariwal_block(sd, name, head_channels: int) -> tuple[dict, dict | None]:
    """EDM's UNetBlock as our ADM residual block (+ attention). Its qkv conv orders the 3C outputs
    as (head, channel, q/k/v)."""
    block = _resblock(sd, name, "edm")
    for key in (f"{name}.conv0.resample_filter", f"{name}.skip.resample_filter"):
        if key in sd and not np.allclose(sd[key], 0.25):
            raise ValueError(
                f"EDM DhariwalUNet: {key} is not the 2x2 box filter; only resample_filter=[1, 1] is supported"
            )
    if f"{name}.qkv.weight" not in sd:
        return block, None
    w, b = sd[f"{name}.qkv.weight"][:, :, 0, 0], sd[f"{name}.qkv.bias"]
    c = w.shape[1]
    if c % head_channels:
        raise ValueError(f"num_head_channels={head_channels} is invalid: it must divide {name}'s {c} channels")
    heads, hd = c // head_channels, head_channels
    attn = {
        "norm": _norm(sd, f"{name}.norm2"),
        "attn": {
            "qkv": {
                "kernel": np.ascontiguousarray(w.reshape(heads, hd, 3, c).transpose(3, 2, 0, 1)),
                "bias": np.ascontiguousarray(b.reshape(heads, hd, 3).transpose(2, 0, 1)),
            },
            "out": {
                "kernel": np.ascontiguousarray(sd[f"{name}.proj.weight"][:, :, 0, 0].T).reshape(heads, hd, c),
                "bias": sd[f"{name}.proj.bias"],
            },
        },
    }
    return block, attn


def _from_dhariwal_unet(sd, options, head_channels: int | None = None):
    """NVlabs/edm's DhariwalUNet (ADM) as our ADM U-Net: AdaGN blocks resampling inside, GroupNorm
    with min(32, C // 4) groups, the label mapping a bias-free Linear after the time MLP (= a table)."""
    _require(sd, ["map_layer0.weight", "map_layer1.weight", "out_norm.weight", "out_conv.weight"], "EDM DhariwalUNet")
    res, mc, c_in, levels, nrb, mult, attn = _edm_levels(sd, "DhariwalUNet")
    nlev = len(levels)
    if sd["map_layer0.weight"].shape[0] != 4 * mc:
        raise ValueError(f"EDM DhariwalUNet with embedding width {sd['map_layer0.weight'].shape[0]} != 4 x {mc}")
    c_out = sd["out_conv.weight"].shape[0]
    if c_out != c_in:
        raise ValueError(f"EDM DhariwalUNet with {c_out} output channels for {c_in} input channels is not supported")
    num_classes = sd["map_label.weight"].shape[1] if "map_label.weight" in sd else 0
    hc = head_channels if head_channels is not None else options.pop("num_head_channels", 64)
    ov = dict(
        image_size=res,
        in_channels=c_in,
        model_channels=mc,
        channel_mult=mult,
        num_res_blocks=nrb,
        attn_resolutions=attn,
        num_head_channels=hc,
        resblock_updown=True,
        use_scale_shift_norm=True,
        num_classes=num_classes,
        learn_sigma=False,
        norm_groups=32,
        min_group_channels=4,
        dropout=0.0,
        time_scale=1.0,
    )
    params: dict = {
        "conv_in": _conv(sd, f"enc.{res}x{res}_conv"),
        "temb0": _linear(sd, "map_layer0"),
        "temb1": _linear(sd, "map_layer1"),
        "norm_out": _norm(sd, "out_norm"),
        "conv_out": _conv(sd, "out_conv"),
        "down": {},
        "up": {},
    }
    if num_classes:
        params["class_embed"] = {"table": _class_table(np.ascontiguousarray(sd["map_label.weight"].T), num_classes)}
    for i, r in enumerate(levels):
        for j in range(nrb):
            params["down"][f"level{i}_block{j}"], a = _dhariwal_block(sd, f"enc.{r}x{r}_block{j}", hc)
            if a is not None:
                params["down"][f"level{i}_attn{j}"] = a
        if i != nlev - 1:
            params["down"][f"level{i}_down"], _ = _dhariwal_block(sd, f"enc.{levels[i + 1]}x{levels[i + 1]}_down", hc)
    deepest = levels[-1]
    params["mid_block0"], params["mid_attn"] = _dhariwal_block(sd, f"dec.{deepest}x{deepest}_in0", hc)
    params["mid_block1"], _ = _dhariwal_block(sd, f"dec.{deepest}x{deepest}_in1", hc)
    for i in reversed(range(nlev)):
        r = levels[i]
        for j in range(nrb + 1):
            params["up"][f"level{i}_block{j}"], a = _dhariwal_block(sd, f"dec.{r}x{r}_block{j}", hc)
            if a is not None:
                params["up"][f"level{i}_attn{j}"] = a
        if i != 0:
            params["up"][f"level{i}_up"], _ = _dhariwal_block(sd, f"dec.{levels[i - 1]}x{levels[i - 1]}_up", hc)
    extras = _edm_extras(options)
    return "ADM-cifar10", ov, params, extras, options


# ----------------------------------------------------------------------------------------------
# EDM network snapshots (.pkl): the network and its preconditioning from the pickled modules
# ----------------------------------------------------------------------------------------------

_EDM_PRECONDS = ("EDMPrecond", "VPPrecond", "VEPrecond")


def _module_tensors(module: PickledObject, prefix: str = "") -> dict[str, np.ndarray]:
    """A pickled torch module's state dict ({dotted name: array}): its parameters and buffers."""
    out = {}
    for group in ("_parameters", "_buffers"):
        for k, v in (getattr(module, group, None) or {}).items():
            if isinstance(v, np.ndarray):
                out[prefix + k] = v
    for k, child in (getattr(module, "_modules", None) or {}).items():
        if isinstance(child, PickledObject):
            out.update(_module_tensors(child, f"{prefix}{k}."))
    return out


def _head_channels(module: PickledObject, path: Path) -> int | None:
    """Channels per attention head of a pickled DhariwalUNet (its blocks record num_heads)."""
    widths = set()
    for part in ("enc", "dec"):
        for block in module._modules[part]._modules.values():
            heads = getattr(block, "num_heads", 0)
            if heads:
                widths.add(block.out_channels // heads)
    if len(widths) > 1:
        raise ValueError(f"{str(path)!r}: attention heads of different widths {sorted(widths)} are not supported")
    return widths.pop() if widths else None


def _from_edm_pickle(path: Path, options):
    obj = load_module_pickle(path)
    net = obj.get("ema") if isinstance(obj, dict) else obj
    if isinstance(net, PickledObject) and net.class_name == "Precond":
        return _from_edm2_pickle(net, path, options)
    if not isinstance(net, PickledObject) or net.class_name not in _EDM_PRECONDS:
        what = net.class_name if isinstance(net, PickledObject) else type(net).__name__
        raise ValueError(
            f"{str(path)!r}: not an EDM network snapshot (a dict whose 'ema' is one of {_EDM_PRECONDS} or "
            f"EDM2's Precond); found {what}"
        )
    if "sigma_data" in options:
        raise ValueError(f"{str(path)!r}: sigma_data is read from the pickle; do not pass it")
    model = (getattr(net, "_modules", None) or {}).get("model")
    kind = getattr(model, "class_name", None)
    if kind not in ("SongUNet", "DhariwalUNet"):
        raise ValueError(f"{str(path)!r}: EDM network {kind!r} is not supported (SongUNet, DhariwalUNet)")
    sd = _module_tensors(model)
    if kind == "DhariwalUNet":
        if "num_head_channels" in options:
            raise ValueError(
                f"{str(path)!r}: the attention heads are read from the pickle; do not pass num_head_channels"
            )
        name, ov, params, extras, options = _from_dhariwal_unet(sd, options, _head_channels(model, path))
    else:
        name, ov, params, extras, options = _from_song_unet(sd, options)
    return name, ov, params, {**extras, **_edm_preconditioning(net)}, options


def _edm2_overrides(net: PickledObject, path: Path) -> dict:
    """EDM2UNetConfig fields of a pickled EDM2 `Precond` (NVlabs/edm2 networks_edm2.py), read from its
    attributes and its layers' shapes (the pickle does not keep the constructor's arguments)."""
    unet = net._modules["unet"]
    enc = unet._modules["enc"]._modules
    resolution = int(net.img_resolution)
    model_channels = int(enc[f"{resolution}x{resolution}_conv"].out_channels)
    levels: dict[int, list] = {}  # resolution -> that level's encoder blocks (not the resamplers)
    for name, block in enc.items():
        res = int(name.split("x")[0])
        if "_block" in name:
            levels.setdefault(res, []).append(block)
    widths = [levels[res][0].out_channels for res in sorted(levels, reverse=True)]
    if any(w % model_channels for w in widths) or len({len(b) for b in levels.values()}) != 1:
        raise ValueError(f"{str(path)!r}: EDM2 levels of widths {widths} / {model_channels} are not supported")
    attention = [b for blocks in levels.values() for b in blocks if int(b.num_heads)]
    head_widths = {b.out_channels // int(b.num_heads) for b in attention} or {64}
    if len(head_widths) != 1:
        raise ValueError(f"{str(path)!r}: attention heads of different widths {sorted(head_widths)} are not supported")
    channel_mult = tuple(w // model_channels for w in widths)
    noise = unet._modules["emb_fourier"]._buffers["freqs"].shape[0]
    emb = int(unet._modules["emb_noise"].out_channels)
    first = levels[resolution][0]
    return dict(
        image_size=resolution,
        in_channels=int(net.img_channels),
        num_classes=int(net.label_dim),
        model_channels=model_channels,
        channel_mult=channel_mult,
        channel_mult_noise=0 if noise == widths[0] else noise // model_channels,
        channel_mult_emb=0 if emb == max(widths) else emb // model_channels,
        num_blocks=len(levels[resolution]),
        attn_resolutions=tuple(
            sorted({res for res, blocks in levels.items() if int(blocks[0].num_heads)}, reverse=True)
        ),
        channels_per_head=head_widths.pop(),
        dropout=float(first.dropout),
        label_balance=float(unet.label_balance),
        concat_balance=float(unet.concat_balance),
        res_balance=float(first.res_balance),
        attn_balance=float(first.attn_balance),
        clip_act=float(first.clip_act or 0.0),
        logvar_channels=int(net._modules["logvar_fourier"]._buffers["freqs"].shape[0]),
    )


def _from_edm2_pickle(net: PickledObject, path: Path, options):
    """EDM2's `Precond` (Karras et al. 2024): EDM preconditioning around the magnitude-preserving U-Net,
    whose log-variance head comes with the parameters (`edm2.logvar_from_params`)."""
    if "sigma_data" in options:
        raise ValueError(f"{str(path)!r}: sigma_data is read from the pickle; do not pass it")
    overrides = _edm2_overrides(net, path)
    params = params_from_edm2_state(_module_tensors(net))
    extras = dict(
        process=EDM(),
        prediction=EDMPreconditioned(float(net.sigma_data)),
        learned_variance=False,
        time_input=lambda c_noise: c_noise,
    )
    return "EDM2-img64-xs", overrides, params, extras, options


def _edm_preconditioning(net: PickledObject) -> dict:
    """Process, prediction and network time of EDM's preconditioning wrappers (Karras et al. 2022,
    Table 1): EDMPrecond F(c_in x; log(sigma) / 4); VPPrecond eps(x_t; (M - 1) t) on the VP SDE with
    beta(t) = beta_min + beta_d t; VEPrecond -eps(x_t; log(sigma / 2)) on the VE SDE."""
    if net.class_name == "EDMPrecond":
        return dict(prediction=EDMPreconditioned(float(net.sigma_data)))
    if net.class_name == "VPPrecond":
        steps = float(net.M) - 1.0
        process = VP(
            beta_min=float(net.beta_min), beta_max=float(net.beta_min + net.beta_d), t_min=float(net.epsilon_t)
        )
        return dict(process=process, prediction="eps", time_input=lambda t: steps * jnp.asarray(t, jnp.float32))
    process = VE(sigma_min=float(net.sigma_min), sigma_max=float(net.sigma_max))
    return dict(
        process=process,
        prediction="eps",
        time_input=lambda t: jnp.log(0.5 * process.sigma(t)),
        output_sign=-1.0,
    )


# ----------------------------------------------------------------------------------------------
# diffusers AutoencoderKL (Stable Diffusion's VAE)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class PretrainedAutoencoder:
    """A loaded autoencoder: `model` (an `AutoencoderKL` with the weights; use `encode_latents` /
    `decode_latents`), its `config` (scaling and shift factors included) and the `format`."""

    model: AutoencoderKL
    config: AutoencoderConfig
    format: str


def _vae_middle(sd, name) -> dict:
    a = f"{name}.attentions.0"
    lin = lambda n: sd[f"{a}.{n}.weight"].reshape(sd[f"{a}.{n}.weight"].shape[:2])  # noqa: E731 (1x1 convs too)
    w = np.stack([lin("to_q").T, lin("to_k").T, lin("to_v").T], axis=1)  # (C, 3, C)
    b = np.stack([sd[f"{a}.to_q.bias"], sd[f"{a}.to_k.bias"], sd[f"{a}.to_v.bias"]])
    return {
        "block0": _resblock(sd, f"{name}.resnets.0", "vae"),
        "attn": {
            "norm": _norm(sd, f"{a}.group_norm"),
            "attn": {
                "qkv": {"kernel": np.ascontiguousarray(w)[:, :, None, :], "bias": b[:, None, :]},
                "out": {"kernel": np.ascontiguousarray(lin("to_out.0").T)[None], "bias": sd[f"{a}.to_out.0.bias"]},
            },
        },
        "block1": _resblock(sd, f"{name}.resnets.1", "vae"),
    }


def _vae_coder(sd, side: str, levels: int, blocks_per_level: int, resample: str) -> dict:
    """diffusers' "encoder" (resample "down") or "decoder" ("up") as our params: level{i}_block{j} and
    level{i}_{resample} (none after the last level) from {side}.{resample}_blocks.{i}, then conv_in,
    the middle, norm_out and conv_out."""
    prefix = f"{side}.{resample}_blocks"
    blocks: dict = {}
    for i in range(levels):
        for j in range(blocks_per_level):
            blocks[f"level{i}_block{j}"] = _resblock(sd, f"{prefix}.{i}.resnets.{j}", "vae")
        if i != levels - 1:
            blocks[f"level{i}_{resample}"] = {"conv": _conv(sd, f"{prefix}.{i}.{resample}samplers.0.conv")}
    return dict(
        blocks=blocks,
        conv_in=_conv(sd, f"{side}.conv_in"),
        mid=_vae_middle(sd, f"{side}.mid_block"),
        norm_out=_norm(sd, f"{side}.conv_norm_out"),
        conv_out=_conv(sd, f"{side}.conv_out"),
    )


def _from_diffusers_vae(sd, config, options, param_dtype, dtype, placement, path) -> PretrainedAutoencoder:
    if options:
        raise ValueError(f"unknown option(s) {sorted(options)} for format 'diffusers-vae'")
    if not config.get("use_quant_conv", True) or not config.get("use_post_quant_conv", True):
        raise ValueError(f"{str(path)!r}: AutoencoderKL without quant convs is not supported")
    cfg = AutoencoderConfig(
        in_channels=config.get("in_channels", 3),
        latent_channels=config.get("latent_channels", 4),
        block_out_channels=tuple(config.get("block_out_channels", (64,))),
        layers_per_block=config.get("layers_per_block", 1),
        norm_groups=config.get("norm_num_groups", 32),
        scaling_factor=float(config.get("scaling_factor", 0.18215)),
        shift_factor=float(config.get("shift_factor") or 0.0),
        dtype=dtype,
        param_dtype=param_dtype,
    ).validate()
    nlev, lpb = len(cfg.block_out_channels), cfg.layers_per_block
    enc = dict(_vae_coder(sd, "encoder", nlev, lpb, "down"), quant_conv=_conv(sd, "quant_conv"))
    dec = dict(_vae_coder(sd, "decoder", nlev, lpb + 1, "up"), post_quant_conv=_conv(sd, "post_quant_conv"))
    model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    _set_params(model, {"encoder": enc, "decoder": dec}, placement, path, "diffusers-vae")
    return PretrainedAutoencoder(model=model, config=cfg, format="diffusers-vae")


def _set_params(model, params, placement: Placement | None, path, kind) -> None:
    """Check `params` against the (abstract) model's parameters and put them in, cast to its dtypes
    and placed by `placement` (see `load_pretrained`)."""
    abstract = nnx.state(model, nnx.Param)
    want = traversals.flatten_mapping(nnx.to_pure_dict(abstract))
    got = traversals.flatten_mapping(params)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f"{str(path)!r} ({kind}): parameters missing {missing[:5]}, unexpected {extra[:5]}")
    for k, leaf in want.items():
        if tuple(got[k].shape) != tuple(leaf.shape):
            raise ValueError(
                f"{str(path)!r} ({kind}): parameter {'/'.join(map(str, k))} has shape {got[k].shape}, "
                f"the model expects {leaf.shape}"
            )
    specs = traversals.flatten_mapping(logical_partition_specs(model)) if placement is not None else {}
    params.clear()  # `got` now holds the only references: each array is freed once it is converted
    typed = {}
    for k, leaf in want.items():
        host = np.asarray(got.pop(k), np.float32).astype(leaf.dtype)
        typed[k] = jax.block_until_ready(
            _to_device(host, None if placement is None else placement(specs[k], host.shape))
        )
        del host
        _release_freed_memory()
    nnx.replace_by_pure_dict(abstract, traversals.unflatten_mapping(typed))
    nnx.update(model, abstract)


def _to_device(host: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """`host` on the default device, or laid out by `sharding`, each device given only its slice."""
    if sharding is None:
        return jnp.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


__all__ = [
    "FORMATS",
    "Placement",
    "Pretrained",
    "PretrainedAutoencoder",
    "ddpm_betas",
    "diffusers_betas",
    "load_pretrained",
]

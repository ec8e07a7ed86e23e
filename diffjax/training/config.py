"""The experiment configuration: every key with its default, and validation before any work.

An experiment is one `ml_collections.ConfigDict` (configs/*.py return one from `get_config()`).
`base_config()` lists every key the library reads; `validate_config` rejects unknown keys and bad
values with a message naming the key, the value and what is allowed, before anything is built or
compiled. Free-form sub-dicts (process.options, model.overrides, loss.*_options,
sample.solver_options) are checked by the functions that consume them, also up front.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil

import ml_collections

from diffjax import losses
from diffjax.processes import PROCESSES
from diffjax.validation import matches_annotation
from diffjax.training.sharding import DEFAULT_RULES

__all__ = [
    "base_config",
    "validate_config",
    "check_workdir",
    "check_free_space",
    "process_options",
    "model_overrides",
    "ConfigError",
    "FREE_FORM_KEYS",
]

# Sub-dicts whose keys are not fixed by the schema (their consumers validate them).
FREE_FORM_KEYS = (
    "process.options",
    "model.overrides",
    "sample.solver_options",
    "sample.grid_options",
    "mesh.rules",
)

NONFINITE_POLICIES = ("skip", "stop")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")


class ConfigError(ValueError):
    """A configuration key or value that is not allowed."""


def base_config() -> ml_collections.ConfigDict:
    """Every configuration key with its default value."""
    from diffjax.data import base_data_config  # the data sub-config is defined next to its reader

    c = ml_collections.ConfigDict()
    c.seed = 0

    c.process = ml_collections.ConfigDict()
    c.process.name = "vp"  # one of diffjax.processes.PROCESSES
    c.process.options = ml_collections.ConfigDict()  # e.g. beta_max=20.0; ddpm: num_steps, beta_start, beta_end

    c.model = ml_collections.ConfigDict()
    c.model.name = "unet-small"  # a preset of diffjax.models.create
    c.model.overrides = ml_collections.ConfigDict()  # preset fields, e.g. model_channels=64
    c.model.class_conditional = False  # condition on the data set's labels (num_classes from the data)

    c.loss = ml_collections.ConfigDict()
    c.loss.prediction = "eps"  # eps | x0 | v | score | flow | edm
    c.loss.target = ""  # "" = the prediction's own space
    c.loss.weighting = "uniform"
    c.loss.time_sampler = "uniform"
    c.loss.sigma_data = 0.5
    c.loss.min_snr_gamma = 5.0  # weighting "min_snr"
    c.loss.sigmoid_bias = 2.0  # weighting "sigmoid"
    c.loss.antithetic = False  # time sampler "uniform"
    c.loss.lognormal_mean = -1.2  # time sampler "lognormal" (EDM's P_mean, P_std)
    c.loss.lognormal_std = 1.2
    c.loss.logit_normal_mean = 0.0  # time sampler "logit_normal"
    c.loss.logit_normal_std = 1.0

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.learning_rate = 2e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.schedule = "constant"  # constant | cosine (after warm-up)
    c.optim.warmup_steps = 100
    c.optim.min_lr_ratio = 0.0  # cosine decays to learning_rate * min_lr_ratio
    c.optim.grad_clip = 1.0  # global-norm clipping; 0 disables

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 10_000
    c.train.batch_size = 128  # global, over all hosts and devices
    c.train.ema_decay = 0.999
    c.train.ema_warmup = True  # decay min(ema_decay, (1 + step) / (10 + step))
    c.train.label_dropout = 0.0  # classifier-free guidance training: rate of null labels
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.sample_every = 0  # 0: sample grids only at the end
    c.train.async_checkpointing = True
    c.train.nonfinite_policy = "skip"  # skip | stop: what a non-finite loss or gradient does
    c.train.max_consecutive_nonfinite = 10  # "skip" stops after this many in a row
    c.train.inject_nonfinite_at = ()  # fault injection for tests: steps whose batch is made NaN
    c.train.progress_bar = True

    c.sample = ml_collections.ConfigDict()
    c.sample.solver = ""  # "" = the library default
    c.sample.steps = 50
    c.sample.grid = ""  # "" = the library default
    c.sample.num_samples = 64
    c.sample.guidance_scale = 1.0  # classifier-free guidance scale (1 = none)
    c.sample.solver_options = ml_collections.ConfigDict()
    c.sample.grid_options = ml_collections.ConfigDict()

    c.eval = ml_collections.ConfigDict()
    c.eval.fid = True  # FID/KID in --mode eval (needs the Inception weights)
    c.eval.num_samples = 1000  # samples for FID/KID, and images of the evaluation split they are compared with
    c.eval.batch_size = 256
    c.eval.loss_batches = 20  # batches of the test split for the test loss
    c.eval.bits_per_dim_examples = 0  # 0 = skip bits/dim
    c.eval.inception_weights = ""  # path to the FID Inception weights; "" = cache / download

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # logical axis -> mesh axes ("" = replicated), e.g. --config.mesh.rules.embed=tensor
    c.mesh.rules = ml_collections.ConfigDict(
        {name: ",".join(axes or ()) for name, axes in DEFAULT_RULES.items()}
    )

    c.data = base_data_config()
    return c


def process_options(name: str, **changes) -> ml_collections.ConfigDict:
    """Every option of process `name` with its default (so each can be overridden from the
    command line), updated with `changes`."""
    import dataclasses

    if name not in PROCESSES:
        raise ConfigError(f"unknown process {name!r}; known processes: {sorted(PROCESSES)}")
    if name == "ddpm":
        options = {"beta_start": 1e-4, "beta_end": 0.02, "num_steps": 1000}
    else:
        options = {f.name: f.default for f in dataclasses.fields(PROCESSES[name])}
    unknown = set(changes) - set(options)
    if unknown:
        raise ConfigError(f"unknown option(s) {sorted(unknown)} for process {name!r}; allowed: {sorted(options)}")
    return ml_collections.ConfigDict({**options, **changes})


# Model fields that come from the data set (image size, channels, classes), not the config.
DATA_DERIVED_MODEL_FIELDS = ("image_size", "in_channels", "num_classes")


def model_overrides(name: str, **changes) -> ml_collections.ConfigDict:
    """Every field of model preset `name` except the data-derived ones, updated with `changes`:
    a config that starts from this can override any model field from the command line.
    Data-derived fields (image_size, in_channels, num_classes) may be given to validate the
    others against them (e.g. attention resolutions); they are left out of the result."""
    import dataclasses

    from diffjax import models

    try:
        preset = models.get_config(name, **changes)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model preset {name!r}: {err}") from err
    fields = {
        f.name: getattr(preset, f.name)
        for f in dataclasses.fields(preset)
        if f.name not in DATA_DERIVED_MODEL_FIELDS
    }
    return ml_collections.ConfigDict(fields)


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------


def _flatten_keys(config, prefix=""):
    keys = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict) and path not in FREE_FORM_KEYS and len(value):
            keys.update(_flatten_keys(value, path + "."))
        else:
            keys[path] = value
    return keys


def _check_known_keys(config) -> None:
    allowed = _flatten_keys(base_config())
    given = _flatten_keys(config)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        key = unknown[0]
        section = key.rsplit(".", 1)[0] if "." in key else ""
        siblings = sorted(k.rsplit(".", 1)[-1] for k in allowed if k.startswith(section + ".")) if section else sorted(
            k for k in allowed if "." not in k
        )
        raise ConfigError(
            f"unknown config key {key!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f"; allowed keys in {section or 'the top level'}: {siblings}"
        )


def _require(condition: bool, key: str, value, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key} = {value!r} is not allowed; expected {allowed}")


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value) -> bool:
    return _int(value) and value > 0


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_config(config) -> None:
    """Raise ConfigError for unknown keys or bad values (cheap: nothing is built or compiled)."""
    _check_known_keys(config)
    from diffjax.models import PRESETS as MODEL_PRESETS

    for key in FREE_FORM_KEYS:
        value = config
        for part in key.split("."):
            value = value[part]
        _require(isinstance(value, (dict, ml_collections.ConfigDict)), key, value, "a dict of options")
    _require(all(isinstance(v, str) for v in config.mesh.rules.values()), "mesh.rules", dict(config.mesh.rules),
             "mesh axis names as strings, e.g. 'fsdp' or 'data,fsdp'")
    _require(_int(config.seed) and abs(config.seed) < 2**63, "seed", config.seed, "an int")
    _require(isinstance(config.process.name, str) and config.process.name in PROCESSES, "process.name",
             config.process.name, f"one of {sorted(PROCESSES)}")
    _require(isinstance(config.model.name, str) and config.model.name in MODEL_PRESETS, "model.name",
             config.model.name, f"one of {list(MODEL_PRESETS)}")
    _require(isinstance(config.model.class_conditional, bool), "model.class_conditional",
             config.model.class_conditional, "True or False")
    fields = {f.name: f.type for f in dataclasses.fields(MODEL_PRESETS[config.model.name])}
    for key, value in config.model.overrides.items():  # unknown keys: the model lists the allowed ones
        if key in fields:
            _require(matches_annotation(fields[key], value), f"model.overrides.{key}", value, f"a {fields[key]}")

    loss = config.loss
    _require(loss.prediction in losses.LOSS_PREDICTIONS, "loss.prediction", loss.prediction,
             f"one of {list(losses.LOSS_PREDICTIONS)}")
    _require(loss.target in ("",) + losses.TARGETS, "loss.target", loss.target, f"'' or one of {list(losses.TARGETS)}")
    _require(loss.weighting in losses.WEIGHTINGS, "loss.weighting", loss.weighting, f"one of {list(losses.WEIGHTINGS)}")
    _require(loss.time_sampler in losses.TIME_SAMPLERS, "loss.time_sampler", loss.time_sampler,
             f"one of {list(losses.TIME_SAMPLERS)}")
    for key in ("sigma_data", "min_snr_gamma", "lognormal_std", "logit_normal_std"):
        _require(_finite_number(loss[key]) and loss[key] > 0, f"loss.{key}", loss[key], "a positive number")
    for key in ("sigmoid_bias", "lognormal_mean", "logit_normal_mean"):
        _require(_finite_number(loss[key]), f"loss.{key}", loss[key], "a finite number")
    _require(isinstance(loss.antithetic, bool), "loss.antithetic", loss.antithetic, "True or False")

    optim = config.optim
    _require(optim.name in OPTIMIZERS, "optim.name", optim.name, f"one of {list(OPTIMIZERS)}")
    _require(_finite_number(optim.learning_rate) and optim.learning_rate > 0, "optim.learning_rate",
             optim.learning_rate, "a positive number")
    for key in ("b1", "b2"):
        value = optim[key]
        _require(_finite_number(value) and 0 <= value < 1, f"optim.{key}", value, "a number in [0, 1)")
    _require(_finite_number(optim.eps) and optim.eps > 0, "optim.eps", optim.eps, "a positive number")
    _require(_finite_number(optim.weight_decay) and optim.weight_decay >= 0, "optim.weight_decay",
             optim.weight_decay, "a number >= 0")
    _require(optim.schedule in SCHEDULES, "optim.schedule", optim.schedule, f"one of {list(SCHEDULES)}")
    _require(_int(optim.warmup_steps) and optim.warmup_steps >= 0, "optim.warmup_steps",
             optim.warmup_steps, "an int >= 0")
    _require(_finite_number(optim.min_lr_ratio) and 0 <= optim.min_lr_ratio <= 1, "optim.min_lr_ratio",
             optim.min_lr_ratio, "a number in [0, 1]")
    _require(_finite_number(optim.grad_clip) and optim.grad_clip >= 0, "optim.grad_clip", optim.grad_clip,
             "a number >= 0 (0 disables clipping)")

    train = config.train
    for key in ("num_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                "max_consecutive_nonfinite"):
        _require(_positive_int(train[key]), f"train.{key}", train[key], "a positive int")
    _require(_int(train.sample_every) and train.sample_every >= 0, "train.sample_every",
             train.sample_every, "an int >= 0 (0: only at the end)")
    _require(_finite_number(train.ema_decay) and 0 <= train.ema_decay < 1, "train.ema_decay", train.ema_decay,
             "a number in [0, 1)")
    _require(_finite_number(train.label_dropout) and 0 <= train.label_dropout < 1, "train.label_dropout",
             train.label_dropout, "a number in [0, 1)")
    for key in ("ema_warmup", "async_checkpointing", "progress_bar"):
        _require(isinstance(train[key], bool), f"train.{key}", train[key], "True or False")
    inject = train.inject_nonfinite_at
    _require(isinstance(inject, (tuple, list)) and all(map(_positive_int, inject)), "train.inject_nonfinite_at",
             inject, "a tuple of positive step numbers")
    _require(train.nonfinite_policy in NONFINITE_POLICIES, "train.nonfinite_policy", train.nonfinite_policy,
             f"one of {list(NONFINITE_POLICIES)}")

    sample = config.sample
    for key in ("solver", "grid"):
        _require(isinstance(sample[key], str), f"sample.{key}", sample[key], "a name ('' = the library default)")
    _require(_positive_int(sample.steps), "sample.steps", sample.steps, "a positive int")
    _require(_positive_int(sample.num_samples), "sample.num_samples", sample.num_samples, "a positive int")
    _require(_finite_number(sample.guidance_scale) and sample.guidance_scale >= 0, "sample.guidance_scale",
             sample.guidance_scale, "a number >= 0")

    _require(isinstance(config.eval.fid, bool), "eval.fid", config.eval.fid, "True or False")
    for key in ("num_samples", "batch_size", "loss_batches"):
        _require(_positive_int(config.eval[key]), f"eval.{key}", config.eval[key], "a positive int")
    _require(_int(config.eval.bits_per_dim_examples) and config.eval.bits_per_dim_examples >= 0,
             "eval.bits_per_dim_examples", config.eval.bits_per_dim_examples, "an int >= 0")
    _require(isinstance(config.eval.inception_weights, str), "eval.inception_weights", config.eval.inception_weights,
             "a path ('' = cache / download)")

    for axis in ("data", "fsdp", "tensor"):
        value = config.mesh[axis]
        _require(_int(value) and (value == -1 or value > 0), f"mesh.{axis}", value,
                 "a positive int or -1 (the remaining devices)")
    _require(sum(config.mesh[a] == -1 for a in ("data", "fsdp", "tensor")) <= 1, "mesh", dict(config.mesh),
             "at most one axis set to -1")


def check_workdir(workdir: str) -> str:
    """Create the directory if needed and make sure it is writable; returns its absolute path."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"work directory {workdir!r} is not writable: {err.strerror or err}") from err
    return workdir


def check_free_space(path: str, needed_bytes: int, what: str) -> None:
    """Raise ConfigError when the file system holding `path` has less than `needed_bytes` free."""
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise ConfigError(
            f"{path!r} has {free / 2**20:.1f} MiB free, but {what} need about {needed_bytes / 2**20:.1f} MiB; "
            "free some disk space or use another work directory"
        )

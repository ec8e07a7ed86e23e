"""The experiment configuration: every key with its default and meaning, validation before any work,
and the command line's overrides.

An experiment is one `ml_collections.ConfigDict` (configs/*.py return one from `get_config()`).
`CONFIG_KEYS` lists every key the library reads with its default and a one-line meaning;
`base_config()` builds the defaults from it. `validate_config` rejects unknown keys and bad values with
a one-line message naming the key, the value and what is allowed (for a misspelt key, the nearest
valid one), before anything is built or compiled.

Option dicts (process.options, model.overrides, loss.*_options, sample.solver_options,
sample.grid_options, inverse.operator_options, inverse.method_options) hold only what differs from
the library's defaults, which live with the objects they configure (the process, model preset,
solver, grid and posterior-method dataclasses, the operator's arguments); `{}` means "the library
default". Their keys are checked against the fields of the object the matching name selects.

On the command line (`apply_overrides`), changing a name that selects an object (process.name,
model.name, sample.solver, sample.grid, loss.weighting, loss.time_sampler, inverse.operator,
inverse.method) empties that object's
option dict first, and `data.name` loads that data preset; the `--config.<dict>.<key>` overrides of
the same command line are applied after that, whatever their order.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import inspect
import math
import os
from typing import Sequence

import ml_collections

from diffjax import losses, models
from diffjax.control.operators import OPERATORS
from diffjax.control.posterior import POSTERIOR_METHODS
from diffjax.data.config import CUSTOM, DATA_KEYS, default_data_config
from diffjax.data.config import PRESETS as DATA_PRESETS
from diffjax.denoisers import PRECONDITIONED, PREDICTIONS
from diffjax.processes import PROCESSES
from diffjax.samplers import FEW_STEPS, GRIDS, SOLVERS
from diffjax.training.discrete_config import DISCRETE_CONFIG_KEYS, discrete_config_problem
from diffjax.training.posthoc_ema import MAX_SIGMA_REL
from diffjax.training.sharding import DEFAULT_RULES
from diffjax.validation import build_named, check_choice, check_dataclass_fields, nearest

__all__ = [
    "CONFIG_KEYS",
    "ConfigError",
    "FREE_FORM_KEYS",
    "SELECTOR_KEYS",
    "apply_overrides",
    "base_config",
    "describe_config",
    "load_config_file",
    "model_preset_overrides",
    "option_fields",
    "process_options",
    "split_config_arguments",
    "validate_config",
]

NONFINITE_POLICIES = ("skip", "stop")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine", "inverse_sqrt")
LIBRARY_DEFAULT = "(library default)"
REQUIRED = "(required)"
# What config.loss.prediction / loss.target may name: a network view, or a preconditioned raw network.
LOSS_PREDICTIONS = PREDICTIONS + tuple(PRECONDITIONED)


class ConfigError(ValueError):
    """A configuration key or value that is not allowed."""


# key: (default, meaning). A dict default marks an option dict (free-form keys, checked by what they select).
CONFIG_KEYS = {
    "seed": (0, "seed of every random stream of the run"),
    "process.name": ("vp", f"the forward process: one of {sorted(PROCESSES)}"),
    "process.options": ({}, "options of the process, e.g. beta_max=20.0 ({} = the process's defaults)"),
    "model.name": ("unet-small", "a preset of diffjax.models (diffjax.models.PRESETS)"),
    "model.overrides": ({}, "preset fields to change, e.g. model_channels=64 ({} = the preset)"),
    "model.class_conditional": (False, "condition on the data set's labels (num_classes from the data)"),
    "loss.prediction": ("eps", f"what the network predicts: one of {list(LOSS_PREDICTIONS)}"),
    "loss.target": ("", "the regression space ('' = the prediction's own)"),
    "loss.weighting": ("constant", f"the loss weighting: one of {list(losses.WEIGHTINGS)}"),
    "loss.weighting_options": ({}, "options of the weighting, e.g. gamma=5.0 for min_snr ({} = its defaults)"),
    "loss.time_sampler": ("uniform", f"how training times are drawn: one of {list(losses.TIME_SAMPLERS)}"),
    "loss.time_sampler_options": ({}, "options of the time sampler, e.g. mean=-1.2 for lognormal ({} = its defaults)"),
    "loss.sigma_data": (0.5, "data standard deviation of EDM preconditioning and the EDM weighting"),
    "loss.uncertainty_weighting": (
        False,
        "weight the loss by the model's learned log-variance u(sigma) (EDM2: l / exp(u) + u; needs an EDM2 model)",
    ),
    "optim.name": ("adamw", f"the optimizer: one of {list(OPTIMIZERS)}"),
    "optim.learning_rate": (2e-4, "peak learning rate"),
    "optim.b1": (0.9, "Adam's first-moment decay"),
    "optim.b2": (0.999, "Adam's second-moment decay"),
    "optim.eps": (1e-8, "Adam's epsilon"),
    "optim.weight_decay": (0.0, "decoupled weight decay (adamw)"),
    "optim.schedule": ("constant", f"learning-rate schedule after warm-up: one of {list(SCHEDULES)}"),
    "optim.warmup_steps": (100, "linear warm-up steps"),
    "optim.min_lr_ratio": (0.0, "cosine decays to learning_rate * min_lr_ratio"),
    "optim.decay_start": (70_000, "inverse_sqrt: the rate falls as 1/sqrt(step / decay_start) after this step"),
    "optim.grad_clip": (1.0, "global-norm gradient clipping; 0 disables"),
    "optim.forced_weight_normalization": (
        False,
        "after each update, rescale every parameter named 'weight' (EDM2's MP layers) to unit RMS per output",
    ),
    "train.num_steps": (10_000, "optimizer steps of the run"),
    "train.batch_size": (128, "global batch size, over all hosts and devices"),
    "train.ema_decay": (0.999, "decay of the parameters' exponential moving average"),
    "train.ema_warmup": (True, "EMA decay min(ema_decay, (1 + step) / (10 + step))"),
    "train.posthoc_ema": ((), "post-hoc EMA: sigma_rel of each power-function EMA tracked, e.g. (0.05, 0.1)"),
    "train.posthoc_ema_every": (0, "steps between post-hoc EMA snapshots (0: with every checkpoint)"),
    "train.label_dropout": (0.0, "classifier-free guidance training: rate of null labels"),
    "train.log_every": (50, "steps between metric logs"),
    "train.checkpoint_every": (1000, "steps between checkpoints"),
    "train.keep_checkpoints": (3, "checkpoints kept on disk"),
    "train.sample_every": (0, "steps between sample grids (0: only at the end)"),
    "train.async_checkpointing": (True, "write checkpoints in the background"),
    "train.nonfinite_policy": ("skip", f"what a non-finite loss or gradient does: one of {list(NONFINITE_POLICIES)}"),
    "train.max_consecutive_nonfinite": (10, "'skip' stops after this many non-finite steps in a row"),
    "train.inject_nonfinite_at": ((), "fault injection for tests: steps whose batch is made NaN"),
    "train.progress_bar": (True, "show a progress bar"),
    "sample.solver": (
        "",
        f"the sampler: one of {sorted(SOLVERS)} ('' = the library default: gaussian_pc up to {FEW_STEPS} steps, "
        "unipc beyond)",
    ),
    "sample.steps": (50, "solver steps"),
    "sample.grid": ("", f"the time grid: one of {sorted(GRIDS)} ('' = the solver's default)"),
    "sample.num_samples": (64, "images sampled for a grid"),
    "sample.guidance_scale": (1.0, "classifier-free guidance scale (1 = none)"),
    "sample.latent_grid": (False, "latent runs: also write the latents' channels as a grid (<grid>_latents.png)"),
    "sample.solver_options": ({}, "options of the solver, e.g. eta=0.5 for ddim ({} = its defaults)"),
    "sample.grid_options": ({}, "options of the grid, e.g. rho=7.0 for karras ({} = its defaults)"),
    "inverse.operator": (
        "",
        f"--mode sample reconstructs measured images when set: one of {sorted(OPERATORS)} ('' = plain sampling)",
    ),
    "inverse.operator_options": ({}, "the operator's arguments, e.g. factor=4 for super_resolution"),
    "inverse.method": ("pigdm", f"the posterior sampler: one of {sorted(POSTERIOR_METHODS)}"),
    "inverse.method_options": (
        {},
        "options of the method, e.g. scale=0.5 for dps ({} = its defaults; data_std defaults to loss.sigma_data)",
    ),
    "inverse.noise_std": (0.0, "standard deviation of the measurement noise (images in [-1, 1])"),
    "inverse.num_images": (8, "images of the evaluation split measured and reconstructed"),
    "eval.fid": (True, "FID/KID in --mode eval (needs the Inception weights)"),
    "eval.num_samples": (
        0,
        "samples for FID/KID, and images of the evaluation split they are compared with "
        "(0 = sized for the machine: 256 on a CPU, 10,000 on an accelerator)",
    ),
    "eval.batch_size": (256, "batch size of evaluation"),
    "eval.loss_batches": (20, "batches of the test split for the test loss"),
    "eval.bits_per_dim_examples": (0, "examples for bits/dim (0 = skip)"),
    "eval.inception_weights": ("", "path to the FID Inception weights ('' = cache / download)"),
    "mesh.data": (-1, "data-parallel mesh axis size (-1: all devices not used by the other axes)"),
    "mesh.fsdp": (1, "fully sharded data-parallel mesh axis size"),
    "mesh.tensor": (1, "tensor-parallel mesh axis size"),
    "mesh.cpu_devices": (
        1,
        "on a CPU-only host, the JAX devices to split it into before JAX starts, the batch sharded "
        "over them (0 = chosen: for the data-parallel mesh, at most one per core, dividing the batch "
        "sizes, >= 16 training examples each; a fully sized mesh gets its product; "
        "diffjax.training.cpu_devices.cpu_device_count); left as is when XLA_FLAGS sets the count",
    ),
    "mesh.rules": (
        {name: ",".join(axes or ()) for name, axes in DEFAULT_RULES.items()},
        "logical axis -> mesh axes ('' = replicated), e.g. --config.mesh.rules.embed=tensor",
    ),
    **{f"data.{key}": (default, meaning) for key, (_, default, meaning) in DATA_KEYS.items()},
    **DISCRETE_CONFIG_KEYS,
}

FREE_FORM_KEYS = tuple(key for key, (default, _) in CONFIG_KEYS.items() if isinstance(default, dict))

# name key -> the option dict it empties when the command line changes it ("data" is replaced by the preset)
SELECTOR_KEYS = {
    "data.name": "data",
    "process.name": "process.options",
    "model.name": "model.overrides",
    "loss.weighting": "loss.weighting_options",
    "loss.time_sampler": "loss.time_sampler_options",
    "sample.solver": "sample.solver_options",
    "sample.grid": "sample.grid_options",
    "inverse.operator": "inverse.operator_options",
    "inverse.method": "inverse.method_options",
    "discrete.process": "discrete.process_options",
    "discrete.sampler": "discrete.sampler_options",
}

# Sampler names that were renamed (former -> current); loss renames are losses.FORMER_NAMES.
FORMER_SAMPLER_NAMES = {"solver": {"edm": "edm_stochastic"}, "grid": {"flow": "flow_time"}}

# Flat loss keys of configs written before the option dicts: key -> (the weighting or time
# sampler it belonged to, its option dict, the option's name there).
FORMER_LOSS_KEYS = {
    "min_snr_gamma": ("weighting", "min_snr", "gamma"),
    "sigmoid_bias": ("weighting", "sigmoid", "bias"),
    "antithetic": ("time_sampler", "uniform", "antithetic"),
    "lognormal_mean": ("time_sampler", "lognormal", "mean"),
    "lognormal_std": ("time_sampler", "lognormal", "std"),
    "logit_normal_mean": ("time_sampler", "logit_normal", "mean"),
    "logit_normal_std": ("time_sampler", "logit_normal", "std"),
}


def upgrade_config_dict(stored: dict) -> tuple[dict, list[str]]:
    """A config dict as an older diffjax stored it with a checkpoint, in today's keys and names:
    (the upgraded copy, one line per change). Renamed losses, solvers and grids get their new
    names; the flat loss keys (min_snr_gamma, lognormal_mean, ...) move into the option dict of
    the weighting or time sampler they configured (and are dropped when that one is not selected);
    keys added since get their defaults. A current config comes back unchanged, with no lines."""
    config = copy.deepcopy(stored)
    changes = []
    loss = config.get("loss", {})
    for key, renames in losses.FORMER_NAMES.items():
        if isinstance(loss.get(key), str) and loss[key] in renames:
            changes.append(f"loss.{key}: {loss[key]!r} -> {renames[loss[key]]!r}")
            loss[key] = renames[loss[key]]
    for key, (selector, name, option) in FORMER_LOSS_KEYS.items():
        if key not in loss:
            continue
        value = loss.pop(key)
        if loss.get(selector) == name:
            loss.setdefault(f"{selector}_options", {})[option] = value
            changes.append(f"loss.{key} -> loss.{selector}_options.{option}")
        else:
            changes.append(f"loss.{key} dropped (loss.{selector} is {loss.get(selector)!r}, not {name!r})")
    sample = config.get("sample", {})
    for key, renames in FORMER_SAMPLER_NAMES.items():
        if isinstance(sample.get(key), str) and sample[key] in renames:
            changes.append(f"sample.{key}: {sample[key]!r} -> {renames[sample[key]]!r}")
            sample[key] = renames[sample[key]]
    for key, (default, _) in CONFIG_KEYS.items():
        *parents, leaf = key.split(".")
        section = config
        for parent in parents:
            section = section.setdefault(parent, {})
        if leaf not in section:
            section[leaf] = copy.deepcopy(default)
            changes.append(f"{key} added with its default {default!r}")
    return config, changes


# Options of the "ddpm" process (a DiscreteVP made from linear betas by get_process).
DDPM_OPTIONS = {"beta_start": 1e-4, "beta_end": 0.02, "num_steps": 1000}
# Model fields that come from the data set (image size, channels, classes), not the config.
DATA_DERIVED_MODEL_FIELDS = ("image_size", "in_channels", "num_classes")


def _set_path(config: ml_collections.ConfigDict, key: str, value) -> None:
    *sections, leaf = key.split(".")
    for section in sections:
        if section not in config:
            config[section] = ml_collections.ConfigDict()
        config = config[section]
    config[leaf] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value


def _get_path(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def base_config() -> ml_collections.ConfigDict:
    """Every configuration key with its default value (see CONFIG_KEYS)."""
    config = ml_collections.ConfigDict()
    for key, (default, _) in CONFIG_KEYS.items():
        _set_path(config, key, copy.deepcopy(default))
    return config


# ------------------------------------------------------------------------------------------------
# option dicts
# ------------------------------------------------------------------------------------------------


def process_options(name: str, **changes) -> ml_collections.ConfigDict:
    """The options of process `name` that differ from its defaults, checked against its fields."""
    try:
        check_choice("process", name, PROCESSES)
        _check_options(_process_fields(name), changes, f"process {name!r}")
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err
    return ml_collections.ConfigDict(changes)


def model_preset_overrides(name: str, **changes) -> ml_collections.ConfigDict:
    """The fields of model preset `name` to change, checked by building the preset's config with them.
    Data-derived fields (image_size, in_channels, num_classes) may be given to validate the others
    against them (e.g. attention resolutions); they are left out of the result (the data set them)."""
    try:
        models.get_config(name, **changes)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model preset {name!r}: {err}") from err
    return ml_collections.ConfigDict({k: v for k, v in changes.items() if k not in DATA_DERIVED_MODEL_FIELDS})


def _process_fields(name: str):
    return DDPM_OPTIONS if name == "ddpm" else PROCESSES[name]


def _check_options(fields, options: dict, what: str) -> None:
    """Option names (and types, for a dataclass) against `fields`: a dataclass or a dict of defaults."""
    if dataclasses.is_dataclass(fields):
        check_dataclass_fields(fields, options, what)
        return
    for key in options:
        if key not in fields:
            hint = nearest(key, fields)
            suggestion = f" (did you mean {hint!r}?)" if hint else ""
            raise ValueError(f"unknown option {key!r} for {what}{suggestion}; allowed: {sorted(fields) or 'none'}")


def _is_name_in(value, table) -> bool:
    return isinstance(value, str) and value in table


def _selected(config, key: str) -> tuple[str, object] | None:
    """(what, fields) for the option dict `key` under the names the config selects; None if unchecked."""
    if key == "process.options":
        return f"process {config.process.name!r}", _process_fields(config.process.name)
    if key == "model.overrides":
        return f"model preset {config.model.name!r}", type(models.PRESETS[config.model.name])
    if key == "sample.solver_options" and config.sample.solver:  # ('': options are refused, validate_config)
        return f"solver {config.sample.solver!r}", SOLVERS[config.sample.solver]
    if key == "sample.grid_options" and config.sample.grid:
        return f"grid {config.sample.grid!r}", GRIDS[config.sample.grid]
    if key == "loss.weighting_options" and _is_name_in(config.loss.weighting, losses.WEIGHTINGS):
        return f"weighting {config.loss.weighting!r}", losses.WEIGHTINGS[config.loss.weighting]
    if key == "loss.time_sampler_options" and _is_name_in(config.loss.time_sampler, losses.TIME_SAMPLERS):
        return f"time sampler {config.loss.time_sampler!r}", losses.TIME_SAMPLERS[config.loss.time_sampler]
    if key == "inverse.operator_options" and _is_name_in(config.inverse.operator, OPERATORS):
        return f"operator {config.inverse.operator!r}", operator_arguments(config.inverse.operator)
    if key == "inverse.method_options" and _is_name_in(config.inverse.method, POSTERIOR_METHODS):
        return f"posterior method {config.inverse.method!r}", POSTERIOR_METHODS[config.inverse.method]
    return None  # mesh.rules: checked below


def operator_arguments(name: str) -> dict:
    """The arguments of OPERATORS[name] after the image shape, with their defaults (REQUIRED where
    there is none)."""
    parameters = list(inspect.signature(OPERATORS[name]).parameters.values())[1:]
    return {p.name: REQUIRED if p.default is inspect.Parameter.empty else p.default for p in parameters}


def option_fields(config, key: str) -> dict:
    """The options the option dict `key` allows under the config's names, with their defaults
    (LIBRARY_DEFAULT where the default is not a plain value); {} when not known here."""
    selected = _selected(config, key)
    if selected is None:
        return {}
    _, fields = selected
    if isinstance(fields, dict):
        return dict(fields)
    if isinstance(fields, type) and key == "model.overrides":
        preset = models.PRESETS[config.model.name]
        return {
            f.name: getattr(preset, f.name)
            for f in dataclasses.fields(preset)
            if f.name not in DATA_DERIVED_MODEL_FIELDS
        }
    return {
        f.name: f.default if f.default is not dataclasses.MISSING else LIBRARY_DEFAULT
        for f in dataclasses.fields(fields)
        if f.init
    }


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


def _unknown_key_message(key: str, known: Sequence[str]) -> str:
    """'unknown config key ...; allowed keys in <section>: [...]; did you mean ...?' for the first part
    of `key` that is not in the schema `known` (dotted keys)."""
    parts = key.split(".")
    for depth in range(len(parts)):
        section = ".".join(parts[:depth])
        prefix = section + "." if section else ""
        children = sorted({k[len(prefix) :].split(".")[0] for k in known if k.startswith(prefix)})
        if parts[depth] not in children:
            break
    hint = nearest(parts[depth], children)
    suggestion = f"; did you mean {'.'.join(parts[:depth] + [hint] + parts[depth + 1 :])!r}?" if hint else ""
    return f"unknown config key {key!r}; allowed keys in {section or 'the top level'}: {children}{suggestion}"


def _check_known_keys(config) -> None:
    known = list(CONFIG_KEYS)
    unknown = sorted(set(_flatten_keys(config)) - set(known))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ConfigError(_unknown_key_message(unknown[0], known) + more)


def _require(condition: bool, key: str, value, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key} = {value!r} is not allowed; expected {allowed}")


def _require_bool(config, key: str) -> None:
    """ConfigError unless config.<key> (a dotted path) is True or False."""
    value = _get_path(config, key)
    _require(isinstance(value, bool), key, value, "True or False")


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value) -> bool:
    return _int(value) and value > 0


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_option_dicts(config) -> None:
    for key in FREE_FORM_KEYS:
        value = _get_path(config, key)
        _require(isinstance(value, (dict, ml_collections.ConfigDict)), key, value, "a dict of options")
    _require(
        all(isinstance(v, str) for v in config.mesh.rules.values()),
        "mesh.rules",
        dict(config.mesh.rules),
        "mesh axis names as strings, e.g. 'fsdp' or 'data,fsdp'",
    )
    for key in FREE_FORM_KEYS:
        selected = _selected(config, key)
        if selected is None:
            continue
        what, fields = selected
        try:
            _check_options(fields, dict(_get_path(config, key)), what)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"config.{key}: {err}") from err


def validate_config(config) -> None:
    """Raise ConfigError for unknown keys or bad values (cheap: nothing is built or compiled)."""
    _check_known_keys(config)
    _require(_int(config.seed) and abs(config.seed) < 2**63, "seed", config.seed, "an int")
    _require(
        isinstance(config.process.name, str) and config.process.name in PROCESSES,
        "process.name",
        config.process.name,
        f"one of {sorted(PROCESSES)}",
    )
    _require(
        isinstance(config.model.name, str) and config.model.name in models.PRESETS,
        "model.name",
        config.model.name,
        f"one of {list(models.PRESETS)}",
    )
    _require_bool(config, "model.class_conditional")
    sample = config.sample
    for key, table in (("solver", SOLVERS), ("grid", GRIDS)):
        _require(isinstance(sample[key], str), f"sample.{key}", sample[key], "a name ('' = the library default)")
        try:
            if sample[key]:
                check_choice(key, sample[key], table)
        except ValueError as err:
            former = FORMER_SAMPLER_NAMES[key].get(sample[key])
            hint = f"; {sample[key]!r} is now called {former!r}" if former else ""
            raise ConfigError(f"config.sample: {err}{hint}") from err
    for key, meaning in (("solver", "the library default, which depends on sample.steps"),
                         ("grid", "the solver's default grid")):  # fmt: skip
        options = sample[f"{key}_options"]  # (not a dict: _check_option_dicts names it)
        if not sample[key] and isinstance(options, (dict, ml_collections.ConfigDict)) and len(options):
            raise ConfigError(
                f"config.sample.{key}_options = {dict(options)} with sample.{key} = '' "
                f"({meaning}): name the {key} the options are for"
            )
    _check_option_dicts(config)

    loss = config.loss
    for key, allowed in (
        ("prediction", LOSS_PREDICTIONS),
        ("target", ("",) + LOSS_PREDICTIONS),
        ("weighting", tuple(losses.WEIGHTINGS)),
        ("time_sampler", tuple(losses.TIME_SAMPLERS)),
    ):
        former = losses.FORMER_NAMES[key].get(loss[key]) if isinstance(loss[key], str) else None
        hint = f"; {loss[key]!r} is now called {former!r}" if former else ""
        _require(_is_name_in(loss[key], allowed), f"loss.{key}", loss[key], f"one of {list(allowed)}{hint}")
    _require(
        _finite_number(loss.sigma_data) and loss.sigma_data > 0, "loss.sigma_data", loss.sigma_data, "a positive number"
    )
    _require_bool(config, "loss.uncertainty_weighting")

    optim = config.optim
    _require(optim.name in OPTIMIZERS, "optim.name", optim.name, f"one of {list(OPTIMIZERS)}")
    _require(
        _finite_number(optim.learning_rate) and optim.learning_rate > 0,
        "optim.learning_rate",
        optim.learning_rate,
        "a positive number",
    )
    for key in ("b1", "b2"):
        value = optim[key]
        _require(_finite_number(value) and 0 <= value < 1, f"optim.{key}", value, "a number in [0, 1)")
    _require(_finite_number(optim.eps) and optim.eps > 0, "optim.eps", optim.eps, "a positive number")
    _require(
        _finite_number(optim.weight_decay) and optim.weight_decay >= 0,
        "optim.weight_decay",
        optim.weight_decay,
        "a number >= 0",
    )
    _require(optim.schedule in SCHEDULES, "optim.schedule", optim.schedule, f"one of {list(SCHEDULES)}")
    _require(
        _int(optim.warmup_steps) and optim.warmup_steps >= 0, "optim.warmup_steps", optim.warmup_steps, "an int >= 0"
    )
    _require(_int(optim.decay_start) and optim.decay_start >= 1, "optim.decay_start", optim.decay_start, "an int >= 1")
    _require(
        _finite_number(optim.min_lr_ratio) and 0 <= optim.min_lr_ratio <= 1,
        "optim.min_lr_ratio",
        optim.min_lr_ratio,
        "a number in [0, 1]",
    )
    _require(
        _finite_number(optim.grad_clip) and optim.grad_clip >= 0,
        "optim.grad_clip",
        optim.grad_clip,
        "a number >= 0 (0 disables clipping)",
    )
    _require_bool(config, "optim.forced_weight_normalization")

    train = config.train
    for key in (
        "num_steps",
        "batch_size",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "max_consecutive_nonfinite",
    ):
        _require(_positive_int(train[key]), f"train.{key}", train[key], "a positive int")
    _require(
        _int(train.sample_every) and train.sample_every >= 0,
        "train.sample_every",
        train.sample_every,
        "an int >= 0 (0: only at the end)",
    )
    _require(
        _finite_number(train.ema_decay) and 0 <= train.ema_decay < 1,
        "train.ema_decay",
        train.ema_decay,
        "a number in [0, 1)",
    )
    _validate_posthoc_ema(train)
    _require(
        _finite_number(train.label_dropout) and 0 <= train.label_dropout < 1,
        "train.label_dropout",
        train.label_dropout,
        "a number in [0, 1)",
    )
    for key in ("ema_warmup", "async_checkpointing", "progress_bar"):
        _require_bool(config, f"train.{key}")
    inject = train.inject_nonfinite_at
    _require(
        isinstance(inject, (tuple, list)) and all(map(_positive_int, inject)),
        "train.inject_nonfinite_at",
        inject,
        "a tuple of positive step numbers",
    )
    _require(
        train.nonfinite_policy in NONFINITE_POLICIES,
        "train.nonfinite_policy",
        train.nonfinite_policy,
        f"one of {list(NONFINITE_POLICIES)}",
    )

    _require(_positive_int(sample.steps), "sample.steps", sample.steps, "a positive int")
    _require(_positive_int(sample.num_samples), "sample.num_samples", sample.num_samples, "a positive int")
    _require(isinstance(sample.latent_grid, bool), "sample.latent_grid", sample.latent_grid, "True or False")
    _require(
        _finite_number(sample.guidance_scale) and sample.guidance_scale >= 0,
        "sample.guidance_scale",
        sample.guidance_scale,
        "a number >= 0",
    )

    _validate_inverse(config.inverse)

    _require_bool(config, "eval.fid")
    for key in ("batch_size", "loss_batches"):
        _require(_positive_int(config.eval[key]), f"eval.{key}", config.eval[key], "a positive int")
    _require(
        _int(config.eval.num_samples) and config.eval.num_samples >= 0,
        "eval.num_samples",
        config.eval.num_samples,
        "an int >= 0 (0 = sized for the machine)",
    )
    _require(
        _int(config.eval.bits_per_dim_examples) and config.eval.bits_per_dim_examples >= 0,
        "eval.bits_per_dim_examples",
        config.eval.bits_per_dim_examples,
        "an int >= 0",
    )
    _require(
        isinstance(config.eval.inception_weights, str),
        "eval.inception_weights",
        config.eval.inception_weights,
        "a path ('' = cache / download)",
    )

    for axis in ("data", "fsdp", "tensor"):
        value = config.mesh[axis]
        _require(
            _int(value) and (value == -1 or value > 0),
            f"mesh.{axis}",
            value,
            "a positive int or -1 (the remaining devices)",
        )
    _require(
        _int(config.mesh.cpu_devices) and config.mesh.cpu_devices >= 0,
        "mesh.cpu_devices",
        config.mesh.cpu_devices,
        "an int >= 0 (0 = chosen from the cores, batch sizes and mesh)",
    )
    _require(
        sum(config.mesh[a] == -1 for a in ("data", "fsdp", "tensor")) <= 1,
        "mesh",
        dict(config.mesh),
        "at most one axis set to -1",
    )
    problem = discrete_config_problem(config)
    if problem is not None:
        _require(False, *problem)


def _validate_posthoc_ema(train) -> None:
    widths = train.posthoc_ema
    _require(
        isinstance(widths, (tuple, list))
        and all(_finite_number(w) and 0 < w < MAX_SIGMA_REL for w in widths)
        and len(set(widths)) == len(widths),
        "train.posthoc_ema",
        widths,
        f"a tuple of distinct sigma_rel values in (0, {MAX_SIGMA_REL:.4f}), e.g. (0.05, 0.1) (() = off)",
    )
    every = train.posthoc_ema_every
    _require(_int(every) and every >= 0, "train.posthoc_ema_every", every, "an int >= 0 (0: with every checkpoint)")


def _validate_inverse(inverse) -> None:
    """config.inverse: names, the operator's required arguments, noise level and image count (the
    option dicts' keys are checked with the other option dicts)."""
    _require(
        inverse.operator == "" or _is_name_in(inverse.operator, OPERATORS),
        "inverse.operator",
        inverse.operator,
        f"one of {sorted(OPERATORS)} or '' (plain sampling)",
    )
    _require(
        _is_name_in(inverse.method, POSTERIOR_METHODS),
        "inverse.method",
        inverse.method,
        f"one of {sorted(POSTERIOR_METHODS)}",
    )
    try:
        build_named(POSTERIOR_METHODS, inverse.method, dict(inverse.method_options), "inverse.method")
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.inverse.method_options: {err}") from err
    if inverse.operator:
        arguments = operator_arguments(inverse.operator)
        missing = [k for k, v in arguments.items() if v == REQUIRED and k not in inverse.operator_options]
        _require(
            not missing,
            "inverse.operator_options",
            dict(inverse.operator_options),
            f"the arguments {missing} of operator {inverse.operator!r} (e.g. "
            f"--config.inverse.operator_options.{missing[0] if missing else ''}=...)",
        )
    _require(
        _finite_number(inverse.noise_std) and inverse.noise_std >= 0,
        "inverse.noise_std",
        inverse.noise_std,
        "a number >= 0",
    )
    _require(_positive_int(inverse.num_images), "inverse.num_images", inverse.num_images, "a positive int")


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`get_config()` of the Python file `spec` ("path" or "path:argument", passed to get_config)."""
    path, _, argument = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist (relative paths: to the working directory)")
    module_spec = importlib.util.spec_from_file_location(f"diffjax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    return module.get_config(argument) if argument else module.get_config()


def split_config_arguments(argv: Sequence[str], name: str = "config") -> tuple[list[str], list[tuple[str, str]]]:
    """(the other arguments, [(key, text), ...]) from `--<name>.<key>=<text>`, `--<name>.<key> <text>`,
    `--<name>.<key>` (= true) and `--no<name>.<key>` (= false) arguments, in command-line order."""
    rest, overrides = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        stripped = arg.lstrip("-")
        negated = stripped.startswith(f"no{name}.")
        if arg.startswith("-") and (stripped.startswith(f"{name}.") or negated):
            key, has_value, text = stripped[len(f"no{name}.") if negated else len(f"{name}.") :].partition("=")
            if negated:
                text = "false"
            elif not has_value:
                follows = i + 1 < len(args) and not args[i + 1].startswith("--")
                text = args[i + 1] if follows else "true"
                i += follows
            overrides.append((key, text))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _literal(text: str):
    if text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string


def _parse_value(key: str, text: str, current):
    """`text` as a value of `current`'s type (a new option key: a Python literal, else the string)."""
    if isinstance(current, str):
        return text
    if isinstance(current, bool):
        lowered = text.strip().lower()
        _require(lowered in ("true", "false", "1", "0"), key, text, "true or false")
        return lowered in ("true", "1")
    value = _literal(text)
    if isinstance(current, int):
        _require(_int(value), key, text, "an int")
    elif isinstance(current, float):
        _require(_finite_number(value), key, text, "a number")
        value = float(value)
    elif isinstance(current, (tuple, list)):
        value = value if isinstance(value, (tuple, list)) else (value,)
        value = tuple(value)
    return value


def _parse_option(key: str, text: str, current):
    """An option's text: like the value it replaces or defaults to; otherwise a Python literal (the
    option dict's consumer checks its type)."""
    if current is None or current in (LIBRARY_DEFAULT, REQUIRED):
        return _literal(text)
    if isinstance(current, (str, bool, tuple, list)):
        return _parse_value(key, text, current)
    value = _literal(text)
    return float(value) if isinstance(current, float) and _int(value) else value


def _check_override_key(config, key: str) -> None:
    """The key names a leaf of the config, or an option in one of its option dicts."""
    known = list(_flatten_keys(config))
    option_dict = key.rsplit(".", 1)[0]
    if key in known and not isinstance(_get_path(config, key), ml_collections.ConfigDict):
        return
    if option_dict in FREE_FORM_KEYS:
        return
    if key in known:  # a section or an option dict as a whole
        raise ConfigError(f"config.{key} is a group of keys; set its keys, e.g. --config.{key}.<key>=<value>")
    raise ConfigError(_unknown_key_message(key, known))


def _select(config, key: str, text: str) -> None:
    """Change a name that selects an object: reset what belongs to the old one."""
    value = text
    if value == _get_path(config, key):
        return
    if key == "data.name":
        try:
            check_choice("data.name", value, DATA_PRESETS + (CUSTOM,))
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if value in DATA_PRESETS:
            config.data = default_data_config(value)
        config.data.name = value
        return
    _set_path(config, key, value)
    _set_path(config, SELECTOR_KEYS[key], {})


def apply_overrides(config, overrides: Sequence[tuple[str, str]]) -> ml_collections.ConfigDict:
    """A copy of `config` with command-line overrides [(key, text), ...] applied.

    Names that select an object (SELECTOR_KEYS) are applied first and reset their option dict (data.name
    loads the data preset); then the other keys in order, each text parsed as the type of the value it
    replaces (a new option: a Python literal, else a string). Unknown keys raise ConfigError naming the
    nearest valid key; the option keys themselves are checked by validate_config.
    """
    config = copy.deepcopy(config)
    for key, _ in overrides:
        _check_override_key(config, key)
    for key, text in overrides:
        if key in SELECTOR_KEYS:
            _select(config, key, text)
    for key, text in overrides:
        if key in SELECTOR_KEYS:
            continue
        option_dict, _, option = key.rpartition(".")
        if option_dict in FREE_FORM_KEYS:
            options = _get_path(config, option_dict)
            current = options[option] if option in options else option_fields(config, option_dict).get(option)
            options[option] = _parse_option(key, text, current)
        else:
            _set_path(config, key, _parse_value(key, text, _get_path(config, key)))
    return config


def describe_config(config) -> str:
    """Every key with its value and meaning, one per line; option dicts list the options that their
    object allows, with the library default where none is set."""
    lines = []
    values = _flatten_keys(config)
    for key in sorted(values, key=lambda k: (list(CONFIG_KEYS).index(k) if k in CONFIG_KEYS else len(CONFIG_KEYS), k)):
        value = values[key]
        meaning = CONFIG_KEYS.get(key, (None, ""))[1]
        if key not in FREE_FORM_KEYS:
            lines.append(f"{key} = {value!r}  # {meaning}")
            continue
        lines.append(f"{key}  # {meaning}")
        selected = _selected(config, key)
        allowed = option_fields(config, key)
        what = selected[0] if selected else key
        for option in sorted(set(allowed) | set(value)):
            if option in value:
                lines.append(f"{key}.{option} = {value[option]!r}  # set; option of {what}")
            else:
                lines.append(f"{key}.{option} = {allowed[option]!r}  # default of {what}")
    return "\n".join(lines)

"""The config's `discrete` section: discrete-state diffusion through the same trainer.

`discrete.process` = "" is a Gaussian run (the section is then only type-checked). A discrete process
name ("masked", "uniform", "d3pm") makes the run train a `SequenceTransformer` on tokens with a loss
of `diffjax.discrete`: the quantised pixels of config.data's images ("pixels": `vocab_size` grey
levels, 2 = binarised at mid-grey, 256 = the 8-bit values) or windows of the stdlib-docstring
character corpus ("text", `diffjax.data.text`; config.data is then unused). model.* is unused in a
discrete run (the network is described by discrete.model_options); sample.steps and
sample.num_samples keep their meaning, sample.solver / grid do not apply.

`discrete_config_problem(config)` returns the first bad value as (key, value, what is allowed), for
config.py to raise as a ConfigError (this module imports nothing of the trainer: no cycle).
"""

from __future__ import annotations

import dataclasses

from diffjax.data.text import CHARS
from diffjax.discrete.losses import DISCRETE_LOSSES
from diffjax.discrete.processes import DISCRETE_PROCESSES
from diffjax.discrete.samplers import DISCRETE_SAMPLERS
from diffjax.models.sequence import SequenceConfig

__all__ = ["DISCRETE_CONFIG_KEYS", "TOKEN_SOURCES", "MODEL_OPTIONS", "discrete_config_problem", "vocab_size_of"]

TOKEN_SOURCES = ("pixels", "text")
TEXT_VOCAB_SIZE = len(CHARS)
PIXEL_LEVELS = 256
# SequenceConfig fields a config may set (the others come from the data and the process).
MODEL_OPTIONS = tuple(
    f.name for f in dataclasses.fields(SequenceConfig) if f.name not in ("num_states", "vocab_size", "length", "causal")
)

# key: (default, meaning), merged into config.CONFIG_KEYS
DISCRETE_CONFIG_KEYS = {
    "discrete.process": ("", f"'' (a Gaussian run) or a discrete process: one of {sorted(DISCRETE_PROCESSES)}"),
    "discrete.process_options": ({}, "options of the process, e.g. schedule='cosine' ({} = its defaults)"),
    "discrete.tokens": ("pixels", f"what the tokens are: one of {list(TOKEN_SOURCES)}"),
    "discrete.vocab_size": (
        0,
        f"token values (0 = the data's own: {PIXEL_LEVELS} pixel levels, {TEXT_VOCAB_SIZE} characters); "
        "pixels: 2 = binarised",
    ),
    "discrete.mask_id": (-1, "the mask state of the masked process: -1 or vocab_size (the state after the tokens)"),
    "discrete.sequence_length": (64, "characters per training window (tokens 'text')"),
    "discrete.loss": ("masked_elbo", f"the loss: one of {list(DISCRETE_LOSSES)}"),
    "discrete.time_free": (True, "RADD's time-free network (masked process, state-independent schedule)"),
    "discrete.sampler": ("ancestral", f"the sampler: one of {sorted(DISCRETE_SAMPLERS)}"),
    "discrete.sampler_options": ({}, "options of the sampler, e.g. temperature=1.0 for confidence"),
    "discrete.cache": (True, "reuse the network's output while x_t does not change (needs time_free)"),
    "discrete.elbo_samples": (8, "times (masked) or steps (others) per example of the -ELBO at --mode eval"),
    "discrete.model_options": ({}, f"SequenceTransformer fields, e.g. hidden_size=128: any of {list(MODEL_OPTIONS)}"),
}


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def vocab_size_of(section) -> int:
    """discrete.vocab_size, with 0 resolved to the data's own."""
    if section.vocab_size:
        return int(section.vocab_size)
    return TEXT_VOCAB_SIZE if section.tokens == "text" else PIXEL_LEVELS


def _type_problem(d):
    """The first value of the wrong type or range, whatever the run."""
    if not isinstance(d.process, str) or (d.process and d.process not in DISCRETE_PROCESSES):
        return "process", d.process, f"'' (a Gaussian run) or one of {sorted(DISCRETE_PROCESSES)}"
    if not (isinstance(d.tokens, str) and d.tokens in TOKEN_SOURCES):
        return "tokens", d.tokens, f"one of {list(TOKEN_SOURCES)}"
    if not (_int(d.vocab_size) and (d.vocab_size == 0 or d.vocab_size >= 2)):
        return "vocab_size", d.vocab_size, "0 (the data's own) or an int >= 2"
    if not (_int(d.mask_id) and d.mask_id >= -1):
        return "mask_id", d.mask_id, "-1 or vocab_size (the state after the tokens)"
    for key in ("sequence_length", "elbo_samples"):
        if not (_int(d[key]) and d[key] >= 1):
            return key, d[key], "a positive int"
    if not (isinstance(d.loss, str) and d.loss in DISCRETE_LOSSES):
        return "loss", d.loss, f"one of {list(DISCRETE_LOSSES)}"
    if not (isinstance(d.sampler, str) and d.sampler in DISCRETE_SAMPLERS):
        return "sampler", d.sampler, f"one of {sorted(DISCRETE_SAMPLERS)}"
    for key in ("time_free", "cache"):
        if not isinstance(d[key], bool):
            return key, d[key], "True or False"
    for key in ("process_options", "sampler_options", "model_options"):
        if not hasattr(d[key], "keys"):
            return key, d[key], "a dict of options"
    unknown = sorted(set(d.model_options.keys()) - set(MODEL_OPTIONS))
    if unknown:
        return "model_options", dict(d.model_options), f"options among {list(MODEL_OPTIONS)} (unknown: {unknown})"
    return None


def _run_problem(config, d):
    """Values that do not fit a discrete run of d.process."""
    vocab = vocab_size_of(d)
    if d.tokens == "text" and vocab != TEXT_VOCAB_SIZE:
        return "vocab_size", d.vocab_size, f"0 or {TEXT_VOCAB_SIZE} (diffjax.data.text's characters) for tokens 'text'"
    if d.tokens == "pixels" and vocab > PIXEL_LEVELS:
        return "vocab_size", d.vocab_size, f"0 or 2 .. {PIXEL_LEVELS} grey levels for tokens 'pixels'"
    if d.mask_id not in (-1, vocab):
        where = "inside the vocabulary" if d.mask_id < vocab else "not the state after the vocabulary"
        return "mask_id", d.mask_id, f"-1 or {vocab} (vocab_size): {d.mask_id} is {where}"
    if d.mask_id == vocab and d.process != "masked":
        return "mask_id", d.mask_id, f"-1: discrete.process {d.process!r} has no mask"
    if d.loss == "masked_elbo" and d.process != "masked":
        return "loss", d.loss, f"'d3pm_hybrid' for discrete.process {d.process!r} (masked_elbo needs 'masked')"
    schedule = d.process_options.get("schedule", "linear") if hasattr(d.process_options, "get") else "linear"
    if d.time_free and (d.process != "masked" or schedule == "learned_polynomial"):
        return "time_free", d.time_free, f"False for discrete.process {d.process!r} with schedule {schedule!r}"
    if d.cache and not d.time_free:
        return "cache", d.cache, "False (caching needs discrete.time_free)"
    if d.tokens == "text" and config.train.inject_nonfinite_at:
        return "train.inject_nonfinite_at", config.train.inject_nonfinite_at, "() (text tokens cannot be made NaN)"
    if d.tokens == "pixels" and config.data.dequantize:
        return "data.dequantize", config.data.dequantize, "False (discrete pixels are the data's own levels)"
    if config.model.class_conditional:
        return "model.class_conditional", True, "False (discrete runs are unconditional)"
    if config.sample.guidance_scale != 1.0:
        return "sample.guidance_scale", config.sample.guidance_scale, "1.0 (discrete runs are unconditional)"
    if config.inverse.operator:
        return "inverse.operator", config.inverse.operator, "'' (inverse problems need a Gaussian run)"
    if config.eval.fid:
        return "eval.fid", True, "False (a discrete run reports bits per dim / per character, not FID)"
    return None


def discrete_config_problem(config):
    """(key under config, value, what is allowed) of the first bad value of config.discrete, or None.
    Keys are relative to `discrete.` unless they contain a dot."""
    d = config.discrete
    problem = _type_problem(d)
    if problem is None and d.process:
        problem = _run_problem(config, d)
    if problem is None:
        return None
    key, value, allowed = problem
    return (key if "." in key else f"discrete.{key}"), value, allowed

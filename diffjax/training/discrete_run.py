"""The pieces of a discrete-state run (config.discrete.process set) for the shared trainer.

`build_run` takes the model, loss and sampler from `discrete_pieces`; everything else (optimizer, EMA,
sharding, checkpoints, resumption, metrics) is the Gaussian path's. The tokens are

    pixels  config.data's images quantised to V = discrete.vocab_size levels in the loss,
            token = round((x + 1) / 2 (V - 1)) (V = 256: the 8-bit values; V = 2: binarised at
            mid-grey); samples come back as images (token / (V - 1)) * 2 - 1, so the image grid,
            the .npz and the image pipeline (its state, its resumption) are the Gaussian run's;
    text    non-overlapping windows of discrete.sequence_length characters of the stdlib-docstring
            corpus (`diffjax.data.text`, splits "train" / "validation"), batched by the image
            pipeline's `BatchPlan` and `InputIterator` (same shuffling, sharding over hosts and
            resumable state); samples are written as a text file.

`discrete_bits_per_dim` is the evaluation: the continuous-time -ELBO of the masked process
(`masked_elbo_nats`, discrete.elbo_samples stratified times per example) or the T-step bound of the
others (`discrete_elbo_nats`, T = discrete.elbo_samples), in bits per token (per dim / per character).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from diffjax import data as data_lib
from diffjax.data.pipeline import BatchPlan, InputIterator
from diffjax.data.text import char_sequences, corpus_fingerprint, decode_tokens
from diffjax.discrete import (
    CategoricalDenoiser,
    bits_per_token,
    build_discrete_process,
    build_discrete_sampler,
    discrete_elbo_nats,
    make_discrete_loss_fn,
    masked_elbo_nats,
    sample_tokens,
)
from diffjax.discrete.processes import MaskedProcess
from diffjax.discrete.samplers import BlockDiffusion
from diffjax.io import atomic_write_text, interactive
from diffjax.models.sequence import SequenceConfig, SequenceTransformer
from diffjax.training.build import build_model_spec
from diffjax.training.config import ConfigError
from diffjax.training.discrete_config import vocab_size_of

__all__ = [
    "discrete_pieces",
    "discrete_sampler",
    "is_discrete",
    "run_data_info",
    "make_run_iterator",
    "tokens_from_images",
    "images_from_tokens",
    "evaluation_tokens",
    "discrete_bits_per_dim",
    "write_text_samples",
]

TEXT_SPLITS = ("train", "validation")


def is_discrete(config) -> bool:
    return bool(config.discrete.process)


def _is_text(config) -> bool:
    return is_discrete(config) and config.discrete.tokens == "text"


# ------------------------------------------------------------------------------------------------
# data: pixels as tokens, text windows
# ------------------------------------------------------------------------------------------------


def tokens_from_images(images, levels: int):
    """Images in [-1, 1] -> int32 tokens round((x + 1) / 2 (levels - 1)), the channel axis dropped."""
    x = jnp.asarray(images, jnp.float32)[..., 0]
    return jnp.clip(jnp.round((x + 1.0) * 0.5 * (levels - 1)), 0, levels - 1).astype(jnp.int32)


def images_from_tokens(tokens, levels: int):
    """Tokens in [0, levels) -> images (..., 1) in [-1, 1]."""
    return (jnp.asarray(tokens, jnp.float32) / (levels - 1) * 2.0 - 1.0)[..., None]


def run_data_info(config) -> data_lib.DataInfo:
    """What the run's data look like: the image pipeline's `dataset_info`, or for text the window shape
    (sequence_length,), windows per split and no classes."""
    if not _is_text(config):
        return data_lib.dataset_info(config.data)
    length = int(config.discrete.sequence_length)
    counts = {split: len(char_sequences(split, length)) for split in TEXT_SPLITS}
    return data_lib.DataInfo((length,), (length,), counts, 0)


@dataclasses.dataclass(frozen=True)
class WindowLoader:
    """batch index -> this host's batch {"tokens": (B, length) int32[, "mask"]} (like BatchLoader)."""

    plan: BatchPlan
    windows: np.ndarray

    def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
        records, valid = self.plan.records(self.plan.positions(batch_index))
        batch = {"tokens": self.windows[records]}
        if not self.plan.drop_remainder and self.plan.num_epochs is not None:
            batch["mask"] = valid
        return batch


def make_run_iterator(config, *, split: str, **options) -> InputIterator:
    """The run's batches: `diffjax.data.make_iterator(config.data, split=split, **options)`, or for
    text the windows of `split` batched by the same plan (shuffled per epoch from (seed, epoch), host
    shards, resumable state); options: global_batch_size, seed, process_index, process_count,
    shuffle, num_epochs, drop_remainder, as make_iterator takes them."""
    if not _is_text(config):
        return data_lib.make_iterator(config.data, split=split, **options)
    if split not in TEXT_SPLITS:
        raise ConfigError(f"the text corpus has splits {list(TEXT_SPLITS)}, not {split!r}")
    length = int(config.discrete.sequence_length)
    windows = char_sequences(split, length)
    plan = BatchPlan(len(windows), **options)
    fields = ("seed", "global_batch_size", "shuffle", "num_epochs", "drop_remainder")
    pipeline = dict(source=corpus_fingerprint(), split=split, num_records=len(windows), sequence_length=length)
    pipeline.update({name: getattr(plan, name) for name in fields})
    return InputIterator(WindowLoader(plan, windows), pipeline)


def evaluation_tokens(config, split: str, num: int, *, batch_size: int) -> np.ndarray:
    """The first `num` examples of `split` as tokens (in the data set's order), on this host."""
    levels = vocab_size_of(config.discrete)
    iterator = make_run_iterator(
        config, split=split, global_batch_size=batch_size, seed=0, shuffle=False, num_epochs=1, drop_remainder=False
    )
    chunks = []
    for batch in iterator:
        keep = np.asarray(batch["mask"])
        tokens = batch["tokens"] if "tokens" in batch else np.asarray(tokens_from_images(batch["image"], levels))
        chunks.append(np.asarray(tokens)[keep])
        if sum(len(c) for c in chunks) >= num:
            break
    return np.concatenate(chunks)[:num]


# ------------------------------------------------------------------------------------------------
# model, loss, sampler
# ------------------------------------------------------------------------------------------------


def _build(what: str, make: Callable):
    try:
        return make()
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.discrete.{what}: {err}") from err


def _sequence_config(config, process, token_shape) -> SequenceConfig:
    options = config.discrete.model_options.to_dict()
    length = token_shape[0] if len(token_shape) == 1 else tuple(token_shape)
    fields = dict(num_states=process.num_states, vocab_size=process.vocab_size, length=length)
    return _build("model_options", lambda: SequenceConfig(**fields, **options).validate())


def _token_shape(config, image_shape) -> tuple:
    return tuple(image_shape) if config.discrete.tokens == "text" else tuple(image_shape[:2])


def discrete_sampler(config, image_shape, to_denoiser: Callable) -> Callable:
    """sampler(denoiser, key, (num, *image_shape)) -> tokens (text) or images in [-1, 1] (pixels), with
    config.discrete.sampler, its options, discrete.cache and sample.steps (checked here, before tracing)."""
    d, vocab = config.discrete, vocab_size_of(config.discrete)
    solver = _build("sampler_options", lambda: build_discrete_sampler(d.sampler, d.sampler_options.to_dict()))
    _build("sampler", lambda: solver.check(to_denoiser(lambda x, t: x)))
    if isinstance(solver, BlockDiffusion):
        _build("sampler_options", lambda: solver.check_shape((1, *_token_shape(config, image_shape))))
    steps, cache, rank = int(config.sample.steps), bool(d.cache), 1 + len(_token_shape(config, image_shape))

    def sampler(denoiser, key, shape):
        tokens = sample_tokens(denoiser, key, shape[:rank], solver, steps, cache=cache).tokens
        return tokens if d.tokens == "text" else images_from_tokens(tokens, vocab)

    return sampler


def discrete_pieces(config, image_shape, num_classes: int, seed: int, mesh: jax.sharding.Mesh) -> tuple:
    """(process, model spec, loss_fn, to_denoiser, sampler, save_samples) of config.discrete for data
    of `image_shape` ((H, W, 1) images for pixels, (length,) for text; the network is unconditional,
    num_classes is not used). sampler(denoiser, key, (num, *image_shape)) returns images or tokens;
    save_samples(tokens, path stem) writes text samples (None for pixels: an image grid). Raises
    ConfigError before tracing."""
    del num_classes, mesh  # the discrete networks' gradients go through the partitioner
    d = config.discrete
    vocab = vocab_size_of(d)
    text = d.tokens == "text"
    if not text and image_shape[-1] != 1:
        raise ConfigError(
            f"config.discrete.tokens = 'pixels' needs grey images (data.channels = 1), got {tuple(image_shape)}"
        )
    token_shape = _token_shape(config, image_shape)
    process = _build("process_options", lambda: build_discrete_process(d.process, vocab, d.process_options.to_dict()))
    spec = build_model_spec(_sequence_config(config, process, token_shape), seed, SequenceTransformer)
    time_free, steps = bool(d.time_free), int(getattr(process, "num_steps", 1000))
    loss = _build(
        "loss", lambda: make_discrete_loss_fn(spec.apply, process, d.loss, time_free=time_free, num_steps=steps)
    )

    def loss_fn(params, key, batch):
        tokens = batch["tokens"] if text else tokens_from_images(batch["image"], vocab)
        return loss(params, key, tokens)

    def to_denoiser(net: Callable) -> CategoricalDenoiser:
        return CategoricalDenoiser(net, process, time_free)

    sampler = discrete_sampler(config, image_shape, to_denoiser)
    return process, spec, loss_fn, to_denoiser, sampler, write_text_samples if text else None


# ------------------------------------------------------------------------------------------------
# evaluation and samples
# ------------------------------------------------------------------------------------------------


def _nats(denoiser: CategoricalDenoiser, key, x0, num: int):
    if isinstance(denoiser.process, MaskedProcess):
        return masked_elbo_nats(denoiser, key, x0, num)
    return discrete_elbo_nats(denoiser, key, x0, num)


def discrete_bits_per_dim(run, params, tokens: np.ndarray, key, *, batch_size: int, num_samples: int) -> dict:
    """Mean -ELBO in bits per token of `tokens` under the run's network (an upper bound on the
    negative log-likelihood), with its standard error over examples."""
    apply = run.spec.apply

    def bits(params, x, key):
        denoiser = run.to_denoiser(lambda x_t, t: apply(params, x_t, t))
        return bits_per_token(_nats(denoiser, key, x, num_samples), x)

    step, masked = jax.jit(run.under_mesh(bits)), isinstance(run.process, MaskedProcess)
    values = []
    for i in tqdm.trange(
        math.ceil(len(tokens) / batch_size), desc="bits/dim (-ELBO)", unit="batch", disable=not interactive()
    ):
        x = jnp.asarray(tokens[i * batch_size : (i + 1) * batch_size])
        values.append(np.asarray(jax.device_get(step(params, x, jax.random.fold_in(key, i)))))
    values = np.concatenate(values)
    return {
        "bits_per_dim": float(values.mean()),
        "stderr": float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else float("nan"),
        "examples": int(values.size),
        "estimator": f"-ELBO, {num_samples} {'times' if masked else 'steps'} per example",
    }


def write_text_samples(tokens, stem: str) -> str:
    """Token windows as one text file `stem`.txt, each sample under a '=== sample i ===' line."""
    parts = [f"=== sample {i} ===\n{decode_tokens(row)}\n" for i, row in enumerate(np.asarray(tokens))]
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    return atomic_write_text(stem + ".txt", "".join(parts))

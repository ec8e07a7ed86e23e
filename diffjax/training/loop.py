"""Train, sample and evaluate from a config, with automatic resumption.

`train(config, workdir)` validates everything first (config keys and values, the data files, the
model against the data, the sampler, the mesh, then the work directory and its free space) and
creates nothing on disk until all of it passed. It then builds a sharded train state (or restores
the newest checkpoint in workdir/checkpoints with the input pipeline's position) and runs the
jitted train step with progress bar, metrics (stdout, JSONL, TensorBoard), checkpoints and sample
grids. Everything the run writes is in `workdir`:

    checkpoints/<step>/     orbax checkpoints (state, data-iterator state, metadata with the config)
    posthoc_ema/step_<n>.npz  post-hoc EMA snapshots (train.posthoc_ema; see posthoc_ema.py)
    metrics.jsonl           one line per logged step
    tensorboard/            event files
    samples/step_<n>.png    sample grids (EMA parameters)
    summary.json            the final metrics of the last run

Faults: SIGTERM/SIGINT (from the start of `train`) finish the current step, save a checkpoint and
return; a save killed half-way leaves the previous checkpoints intact (see checkpoint.py); a
damaged checkpoint is reported and an older one used; non-finite steps are skipped or stop the
run (train.nonfinite_policy), naming non-finite input data; a checkpoint from an incompatible
config, or one whose learning-rate schedule the config would change, is refused by its
differing fields.

`sample_from_checkpoint` and `evaluate` load the run with `load_run` (model and parameters from
the checkpoint's stored config; the given config's sample and eval sections say what to do).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from diffjax import evaluation
from diffjax.io import atomic_write, atomic_write_json, interactive
from diffjax.training import eval_metrics as eval_lib
from diffjax.training import from_config as fc
from diffjax.training import posthoc_ema
from diffjax.training import sharding as shard_lib
from diffjax.training.checkpoint import Checkpointer
from diffjax.training.config import ConfigError, validate_config
from diffjax.training.discrete_run import (
    discrete_bits_per_dim,
    discrete_sampler,
    evaluation_tokens,
    is_discrete,
    make_run_iterator,
    run_data_info,
)
from diffjax.training.images import save_image_grid, to_uint8
from diffjax.training.latents import reference_images_config, with_latent_decoder
from diffjax.training.load import LoadedRun, load_run, read_run_metadata
from diffjax.training.metrics import MetricWriter
from diffjax.training.run import (
    Run,
    build_run,
    check_batch_sizes,
    check_compatible,
    check_environment,
    config_compatibility,
    gather_to_host,
    make_jitted_sampler,
    make_jitted_train_step,
    restore_or_init,
)

__all__ = [
    "train",
    "prepare_training",
    "prepare_run",
    "sample_from_checkpoint",
    "evaluate",
    "TrainingStopped",
    "fid_sample_count",
]

log = logging.getLogger("diffjax")

# FID/KID sample count when config.eval.num_samples is 0 ("sized for the machine").
FID_SAMPLES_ACCELERATOR = 10_000
FID_SAMPLES_CPU = 256


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (non-finite policy); the message says why."""


# ------------------------------------------------------------------------------------------------
# stop requests (SIGTERM / SIGINT): finish the step, save, exit cleanly
# ------------------------------------------------------------------------------------------------


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag checked between steps (a second SIGINT interrupts)."""

    def __init__(self):
        self.signal: int | None = None

    def __call__(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    @property
    def reason(self) -> str:
        """What stopped the run (another process's signal, if this one received none)."""
        return f"signal {signal.Signals(self.signal or signal.SIGTERM).name}"

    @contextlib.contextmanager
    def installed(self):
        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self)
        except ValueError:  # not in the main thread: no handlers
            previous = {}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def any_process_stopping(flag: bool) -> bool:
    """True on every process if any process received a stop signal (all stop at the same step)."""
    if jax.process_count() == 1:
        return flag
    flags = multihost_utils.process_allgather(np.asarray([flag], np.int32))
    return bool(np.any(flags))


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------


def prepare_training(config, workdir: str, devices=None) -> tuple[Run, str]:
    """Every check of a training run, in order, creating nothing: config, data files, the pieces
    (model, loss, sampler, mesh), batch sizes, then the work directory and its free space.
    Returns (run, absolute workdir)."""
    validate_config(config)
    data_info = run_data_info(config)  # missing files, bad image size: clear errors
    mesh = fc.mesh_from_config(config, devices)
    run = with_latent_decoder(build_run(config, data_info, mesh), config)  # latent data: loads the autoencoder
    check_batch_sizes(
        mesh, {"train.batch_size": int(config.train.batch_size), "eval.batch_size": int(config.eval.batch_size)}
    )
    workdir = check_environment(workdir, run.abstract_state, int(config.train.keep_checkpoints))
    return run, workdir


def prepare_run(config, workdir: str, devices=None) -> Run:
    """The run of `config` after every check of `prepare_training` (creates nothing)."""
    return prepare_training(config, workdir, devices)[0]


def train(config, workdir: str, devices=None) -> dict:
    """Train from `config` in `workdir` (resuming from its newest checkpoint); returns a summary.

    devices: the devices of the mesh (default: every device of every process). SIGTERM/SIGINT at
    any time (set-up and compilation included) finish the current step, save and return with
    summary["stopped_by"]."""
    stop = StopRequest()
    with stop.installed():
        return _train(config, workdir, devices, stop)


def _write_sample_grid(run: Run, workdir: str, sampler, params, name: str) -> str | None:
    images = sampler(params, run.key("sample_grid"))
    if not run.is_main_process:
        return None
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    return _save_samples(run, images, os.path.join(workdir, "samples", name))


def _save_samples(run: Run, samples, stem: str) -> str:
    """stem.png: an image grid, or what run.save_samples writes (e.g. stem.txt for text)."""
    if run.save_samples is not None:
        return run.save_samples(samples, stem)
    return save_image_grid(samples, stem + ".png", upscale=max(1, 64 // max(run.image_shape[:2])))


def _save_posthoc_snapshot(run: Run, workdir: str, step: int, state, sigma_rels) -> None:
    """The tracked post-hoc EMA profiles of `state`, gathered to the host, written atomically."""
    averages = [jax.tree.map(gather_to_host, average) for average in state.tracked_averages]
    if run.is_main_process:
        posthoc_ema.save_snapshot(workdir, step, sigma_rels, averages)


def nonfinite_inputs(batch: dict) -> str:
    """'image: 3 NaN, 1 inf' for the arrays of a host batch holding non-finite values ('' if none)."""
    found = []
    for name, value in batch.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating):
            nan, inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
            if nan or inf:
                found.append(f"{name}: {nan} NaN, {inf} inf of {value.size} values")
        elif np.issubdtype(value.dtype, np.integer) and name == "label" and value.size and value.min() < 0:
            found.append(f"{name}: negative labels")
    return "; ".join(found)


def _train(config, workdir: str, devices, stop: StopRequest) -> dict:
    run, workdir = prepare_training(config, workdir, devices)
    t = config.train
    num_steps, log_every = int(t.num_steps), int(t.log_every)
    checkpoint_every, sample_every = int(t.checkpoint_every), int(t.sample_every)
    sigma_rels = tuple(float(s) for s in t.posthoc_ema)
    snapshot_every = (int(t.posthoc_ema_every) or checkpoint_every) if sigma_rels else 0
    inject_nonfinite_at = frozenset(t.inject_nonfinite_at)
    policy, max_nonfinite = t.nonfinite_policy, int(t.max_consecutive_nonfinite)

    os.makedirs(os.path.join(workdir, "checkpoints"), exist_ok=True)  # all checks passed
    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=int(t.keep_checkpoints),
        async_save=bool(t.async_checkpointing),
        remove_unfinished=True,
    )
    try:
        state, data_state, restored = restore_or_init(run, checkpointer)
    except BaseException:
        checkpointer.close()
        raise
    if restored is not None:
        if restored.skipped:
            log.warning("skipped unreadable checkpoints at steps %s", restored.skipped)
        log.info("resumed from the checkpoint at step %d", restored.step)
    start_step = int(jax.device_get(state.step))

    iterator = make_run_iterator(
        config,
        split="train",
        global_batch_size=int(t.batch_size),
        seed=run.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if data_state is not None:
        iterator.set_state(data_state)

    train_step = make_jitted_train_step(run)
    sampler = make_jitted_sampler(run, int(config.sample.num_samples))
    writer = MetricWriter(workdir, enabled=run.is_main_process)
    log.info(
        "model %s: %.2fM parameters; mesh %s; data %s %s; %d -> %d steps",
        f"SequenceTransformer ({config.discrete.process} diffusion)" if is_discrete(config) else config.model.name,
        run.spec.num_params / 1e6,
        dict(run.mesh.shape),
        "text corpus" if config.discrete.tokens == "text" and is_discrete(config) else config.data.source,
        run.image_shape,
        start_step,
        num_steps,
    )
    progress = tqdm.tqdm(
        total=num_steps,
        initial=start_step,
        unit="step",
        dynamic_ncols=True,
        disable=not (run.is_main_process and t.progress_bar and interactive()),
        file=sys.stderr,
    )

    def save(step, state):
        return checkpointer.save(step, state, iterator.get_state(), run.metadata)

    step, last_metrics, stop_reason, saved_step = start_step, {}, None, start_step
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < num_steps:
            if any_process_stopping(stop.signal is not None):
                stop_reason = stop.reason
                break
            batch = next(iterator)
            if step + 1 in inject_nonfinite_at:
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            state, metrics = train_step(state, shard_lib.global_batch(batch, run.mesh))
            step += 1
            window_steps += 1
            progress.update(1)
            nonfinite_run = int(jax.device_get(state.consecutive_nonfinite))
            if nonfinite_run:
                _check_nonfinite(
                    policy,
                    max_nonfinite,
                    step,
                    nonfinite_run,
                    int(jax.device_get(state.skipped_steps)),
                    nonfinite_inputs(batch),
                )
            if step % log_every == 0 or step == num_steps:
                elapsed = time.perf_counter() - window_start
                last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                last_metrics["steps_per_second"] = window_steps / max(elapsed, 1e-9)
                last_metrics["skipped_steps"] = int(jax.device_get(state.skipped_steps))
                writer.write(step, last_metrics)
                progress.set_postfix(loss=f"{last_metrics['loss']:.4f}", refresh=False)
                window_start, window_steps = time.perf_counter(), 0
            if step % checkpoint_every == 0:
                save(step, state)
                saved_step = step
            if snapshot_every and step % snapshot_every == 0:
                _save_posthoc_snapshot(run, workdir, step, state, sigma_rels)
            if sample_every and step % sample_every == 0 and step < num_steps:
                _write_sample_grid(run, workdir, sampler, state.ema_params, f"step_{step:07d}")
    except BaseException:
        _final_save(checkpointer, save, step, saved_step, state, quiet=True)
        raise
    finally:
        progress.close()
        writer.close()
    _final_save(checkpointer, save, step, saved_step, state)
    if snapshot_every and step % snapshot_every and step > start_step:
        _save_posthoc_snapshot(run, workdir, step, state, sigma_rels)
    if stop_reason is None and any_process_stopping(stop.signal is not None):  # came in the last step
        stop_reason = stop.reason  # exit promptly: no final samples

    summary = {"step": step, "num_params": run.spec.num_params, **last_metrics}
    if stop_reason is not None:
        log.info("stopped by %s at step %d; checkpoint saved in %s", stop_reason, step, checkpointer.directory)
        summary["stopped_by"] = stop_reason
        return summary
    summary["samples"] = _write_sample_grid(run, workdir, sampler, state.ema_params, f"step_{step:07d}")
    summary["checkpoint"] = os.path.join(checkpointer.directory, str(step))
    if run.is_main_process:
        atomic_write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


def _final_save(checkpointer: Checkpointer, save, step: int, saved_step: int, state, quiet: bool = False) -> None:
    """Save the state reached (unless already saved) and wait for the write to be committed.
    quiet: log a failure instead of raising it (never mask the error that ended training)."""
    try:
        if step != saved_step:
            save(step, state)
        checkpointer.close()
    except Exception:
        if not quiet:
            raise
        log.exception("saving the final checkpoint at step %d failed", step)


def _check_nonfinite(
    policy: str, max_consecutive: int, step: int, consecutive: int, skipped: int, bad_inputs: str
) -> None:
    limit = 1 if policy == "stop" else max_consecutive
    cause = (
        f"the batch holds non-finite input data ({bad_inputs})"
        if bad_inputs
        else "the batch is finite: the loss or gradient overflowed"
    )
    log.warning(
        "step %d: non-finite loss or gradient; update skipped (%d in a row, %d in total); %s",
        step,
        consecutive,
        skipped,
        cause,
    )
    if consecutive >= limit:
        hint = (
            "Check the data set for NaN/inf."
            if bad_inputs
            else "Lower optim.learning_rate, set optim.grad_clip, or check the data for NaN/inf."
        )
        raise TrainingStopped(
            f"stopping at step {step}: {consecutive} consecutive steps with non-finite loss or gradients "
            f"(policy {policy!r}, limit {limit}); {cause}. Parameters stay at the last finite update and the "
            f"last checkpoint holds finite parameters. {hint}"
        )


# ------------------------------------------------------------------------------------------------
# sample and evaluate from the newest checkpoint
# ------------------------------------------------------------------------------------------------


def load_for_config(config, workdir: str, devices=None) -> tuple[LoadedRun, Run]:
    """The run in workdir (checked against `config`'s model, process and data shape), and its Run
    sampling with config.sample. Raises before anything is written."""
    validate_config(config)
    mesh = fc.mesh_from_config(config, devices)
    step, saved = read_run_metadata(workdir)  # no checkpoint: CheckpointError, nothing created
    check_compatible(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        step,
        saved,
        {"compatibility": config_compatibility(config)},
        schedule=False,
    )
    loaded = load_run(workdir, mesh=mesh, latent_decoder=False)  # the decoder: config.data's, below
    scale = float(config.sample.guidance_scale)
    if scale != 1.0 and not loaded.run.spec.conditional:
        raise ConfigError(f"config.sample.guidance_scale = {scale} needs a class-conditional model; use 1.0")
    if is_discrete(config):
        sampler = discrete_sampler(config, loaded.run.image_shape, loaded.run.to_denoiser)
    else:
        sampler = fc.sampler_from_config(config)
    return loaded, with_latent_decoder(loaded.run.with_sampler(sampler, scale), config)


def sample_from_checkpoint(config, workdir: str, devices=None) -> dict:
    """Sample config.sample.num_samples images with the EMA parameters of the newest checkpoint
    (loaded with load_run); writes a PNG grid and an .npz of uint8 images to workdir/samples (text
    runs: a .txt and an .npz of the tokens)."""
    loaded, run = load_for_config(config, workdir, devices)
    sampler = make_jitted_sampler(run, int(config.sample.num_samples))
    start = time.perf_counter()
    images = sampler(loaded.ema_params, run.key("sample"))
    seconds = time.perf_counter() - start
    step = loaded.step
    summary = {"step": step, "num_samples": int(images.shape[0]), "seconds": seconds}
    if run.is_main_process:
        out = os.path.join(loaded.workdir, "samples")
        os.makedirs(out, exist_ok=True)
        summary["grid"] = _save_samples(run, images, os.path.join(out, f"sample_step_{step:07d}"))
        arrays = _sample_arrays(config, run, images)
        summary["npz"] = atomic_write(os.path.join(out, f"sample_step_{step:07d}.npz"), lambda f: np.savez(f, **arrays))
    return summary


def _sample_arrays(config, run: Run, samples) -> dict:
    """What a sample .npz holds: tokens (discrete runs), latents and their decoded uint8 images
    (latent runs; latents only without an autoencoder), or uint8 images."""
    if is_discrete(config):
        return {"tokens": samples}
    if config.data.source == "latents":
        decoded = {"images": to_uint8(run.decode(samples))} if run.decode is not None else {}
        return {"latents": np.asarray(samples, np.float32), **decoded}
    return {"images": to_uint8(samples)}


def _check_latent_evaluation(config, run: Run) -> None:
    """FID of a latent run needs the autoencoder; bits/dim is defined for uint8 images only."""
    if config.data.source != "latents":
        return
    if config.eval.fid and run.decode is None:
        raise ConfigError(
            f"config.eval.fid = True on latents needs an autoencoder to decode the samples: the latent cache "
            f"{config.data.path!r} names none that exists; set config.data.autoencoder or config.eval.fid=False"
        )
    if config.eval.fid:
        reference_images_config(config.data)  # the cache names the images it encoded
    if config.eval.bits_per_dim_examples:
        raise ConfigError(
            f"config.eval.bits_per_dim_examples = {config.eval.bits_per_dim_examples}: bits/dim is measured on "
            "uint8 images, not on latents; use 0 for a latent run"
        )


def evaluation_split(data_info) -> str:
    """ "test" when the data set has one, else "validation" (e.g. the text corpus), else "train" (e.g.
    scikit-learn's 8x8 digits)."""
    return next((s for s in ("test", "validation") if s in data_info.num_examples), "train")


def test_loss(run: Run, config, params, split: str, *, batches: int, batch_size: int) -> float:
    """Mean denoising loss of `params` on `split` of config's data (fixed keys: comparable across runs)."""
    iterator = make_run_iterator(
        config,
        split=split,
        global_batch_size=batch_size,
        seed=run.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        shuffle=False,
        num_epochs=1,
    )
    loss_fn = run.loss_fn
    evaluate_batch = jax.jit(run.under_mesh(lambda p, key, batch: loss_fn(p, key, batch)[0]))
    values = []
    for i, batch in enumerate(iterator):
        if i >= batches:
            break
        values.append(float(evaluate_batch(params, jax.random.key(i), shard_lib.global_batch(batch, run.mesh))))
    if not values:
        raise ConfigError(f"the {split!r} split yielded no batch of {batch_size}; lower config.eval.batch_size")
    return float(np.mean(values))


def _evaluate_discrete(config, run: Run, loaded: LoadedRun, split: str) -> dict:
    """A discrete run's -ELBO in bits per dim / per character on config.eval.bits_per_dim_examples
    examples of `split`, and its samples (config.sample.num_samples) written next to the checkpoint."""
    d, batch = config.discrete, int(config.eval.batch_size)
    summary = {"sampler": {"discrete.sampler": d.sampler, "sample.steps": config.sample.steps, "cache": d.cache}}
    if config.eval.bits_per_dim_examples:
        tokens = evaluation_tokens(config, split, int(config.eval.bits_per_dim_examples), batch_size=batch)
        summary["bits_per_dim"] = discrete_bits_per_dim(
            run, loaded.ema_params, tokens, run.key("bits_per_dim"), batch_size=batch, num_samples=int(d.elbo_samples)
        )
    samples = make_jitted_sampler(run, int(config.sample.num_samples))(loaded.ema_params, run.key("sample"))
    if run.is_main_process:
        stem = os.path.join(loaded.workdir, "samples", f"eval_step_{loaded.step:07d}")
        os.makedirs(os.path.dirname(stem), exist_ok=True)
        summary["samples"] = _save_samples(run, samples, stem)
    return summary


def fid_sample_count(requested: int, platform: str | None = None) -> int:
    """The FID/KID sample count: `requested` if > 0, else sized for the machine
    (FID_SAMPLES_CPU on a CPU, FID_SAMPLES_ACCELERATOR on an accelerator)."""
    if requested > 0:
        return int(requested)
    platform = platform or jax.devices()[0].platform
    return FID_SAMPLES_CPU if platform == "cpu" else FID_SAMPLES_ACCELERATOR


def evaluate(config, workdir: str, devices=None) -> dict:
    """Evaluate the newest checkpoint's EMA parameters (loaded with load_run): the test-split
    denoising loss; FID and KID of `fid_sample_count(config.eval.num_samples)` samples (configured
    sampler) against as many images of the evaluation split, unless config.eval.fid is False;
    bits/dim of config.eval.bits_per_dim_examples images. A latent run (data.source="latents"): FID
    and KID of decoded samples against the image data set the cache was encoded from. A discrete
    run (config.discrete.process set): the -ELBO in bits per dim / per character and samples
    written next to the checkpoint."""
    loaded, run = load_for_config(config, workdir, devices)
    data_info = run_data_info(config)
    batch = int(config.eval.batch_size)
    check_batch_sizes(run.mesh, {"eval.batch_size": batch})
    _check_latent_evaluation(config, run)
    params, split = loaded.ema_params, evaluation_split(data_info)
    summary = {
        "step": loaded.step,
        "split": split,
        "test_loss": test_loss(run, config, params, split, batches=int(config.eval.loss_batches), batch_size=batch),
        "sampler": {k: config.sample[k] for k in ("solver", "steps", "grid", "guidance_scale")},
    }
    if is_discrete(config):
        summary.update(_evaluate_discrete(config, run, loaded, split))
    if config.eval.fid:
        num = fid_sample_count(int(config.eval.num_samples))
        log.info("FID/KID on %d samples against %d %r images (config.eval.num_samples)", num, num, split)
        inception = evaluation.load_inception_params(config.eval.inception_weights or None)
        images = reference_images_config(config.data) if config.data.source == "latents" else config.data
        reference = eval_lib.reference_for_split(images, split, num, inception, batch_size=batch)
        samples = eval_lib.sample_images(run, params, num, run.key("fid"), batch_size=batch)
        summary.update(eval_lib.sample_quality(samples, reference, inception, batch_size=batch))
    if config.eval.bits_per_dim_examples and not is_discrete(config):
        images, labels = eval_lib.split_images(
            config.data, split, int(config.eval.bits_per_dim_examples), batch_size=batch
        )
        summary["bits_per_dim"] = eval_lib.dataset_bits_per_dim(
            run, params, images, labels, run.key("bits_per_dim"), batch_size=batch
        )
    if run.is_main_process:
        atomic_write_json(os.path.join(loaded.workdir, f"eval_step_{summary['step']:07d}.json"), summary)
    return summary

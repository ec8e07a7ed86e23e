"""Few-step students of a trained MNIST teacher: FID at 1, 2 and 4 NFE against the teacher at 50 NFE.

Teacher: a run directory trained by the library, or its weights file written by
`diffjax.training.save_run_weights` (read by `load_run`), on the EDM process with edm_preconditioned
prediction (e.g. unet-small on MNIST, `configs/mnist.py`). A class-conditional
teacher trained with label dropout is used unconditionally, through its null class (the students
too; the FID reference is the unconditional test split). Students have the teacher's architecture,
are initialised from the teacher's EMA parameters, and are trained with
`diffjax.training.make_train_step` on the run's training images (the stored config's data
pipeline); the teacher's weights travel in the params pytree, frozen by the trainable mask.

    cd        consistency distillation on EDM (Song et al. 2023): one DDIM step of the teacher,
              Karras grid of 18 intervals, L2 (the paper's LPIPS is not in the library), target
              theta^- = stop_gradient(theta) (as iCT; no EMA target). The consistency function's raw
              network sees EDM's (c_in x, c_noise), the teacher's inputs, so the teacher's F is a
              good start. Sampled by `ConsistencySampler` through the noise levels CD_SIGMAS.
    pd        progressive distillation on EDM (Salimans & Ho 2022): the teacher's DDIM on a Karras
              grid of 16 steps, halved 4 times (8, 4, 2, 1 steps; --pd-start-steps; --iterations split
              over the rounds; each round starts from the previous student and uses it as teacher).
              Image convention: the student keeps the teacher's EDM preconditioning and regresses
              x0 with weight max(SNR, 1) (the mixture script's TrigFlow v target is not used: on EDM,
              v is not normalised). Sampled by DDIM on its grid.
    scd       continuous-time consistency distillation (sCM, Lu & Song 2024) on TrigFlow with the
              teacher's sigma_data and noise range (t = atan(s / sd)): the student's raw network is
              F(x/sd, t) = -F_teacher(x/sd, log(sd tan t) / 4), so its consistency function
              cos(t) x - sin(t) sd F starts as the teacher's EDM denoiser (EDM's c_in x equals x_t/sd
              on TrigFlow); tangent by `jax.jvp` through the U-Net, normalised (c = 0.1), adaptive
              weighting, tangent warm-up over the first SCD_WARMUP_FRACTION of --iterations, sCM's
              log-normal times (-1.0, 1.4); the teacher's velocity is its EDM denoiser on TrigFlow.
              Sampled by `ConsistencySampler` through CD's noise levels (CD_SIGMAS, as TrigFlow times).
    dmd+reg   distribution matching (Yin et al. 2024) with its regression term: a one-step
              generator (the teacher's network read at sigma_max, EDM-preconditioned), a fake
              denoiser (a copy of the teacher, trained online), log-normal matching times,
              regression weight --regression-weight (DMD's 0.25), L2, pairs (noise, teacher
              sample) made by `teacher_ode_pairs` with the default solver and 49 steps + the
              final denoising (--regression-pairs of them) before the first step a run trains (made
              again by a continued run), a batch of pairs per step. One-step
              only: the 2 and 4 NFE rows are not defined for it.

All students use Adam (--lr, beta2 = 0.99, as consistency-model papers) and an EMA of decay --ema,
sampled with the EMA parameters. Each row samples --samples images for each of --seeds
(jax.random.key(seed)) and reports the FID of every seed, their mean and standard error against the
first --reference-images images of the evaluation split (Inception statistics cached in
~/.cache/diffjax/fid_stats). The teacher row: the library's default solver (UniPC), 49 steps plus
the final denoising = 50 NFE.

    python -m experiments.distill_mnist --teacher work/mnist                    # the full table
    python -m experiments.distill_mnist --teacher /tmp/mnist_repro/w --iterations 3 --samples 64 \\
        --seeds 0 --reference-images 256 --name distill_mnist_smoke --out /tmp/distill_smoke \\
        --results-dir /tmp/distill_smoke/results                                 # smoke run

Writes <--results-dir>/<--name>.{json,md} (default experiments/results) after every finished row
and sample grids <--results-dir>/<--name>_grids/<method>_nfe<k>.png; student parameters go to --out.

On a CPU the script splits it into devices as the command line does (--cpu-devices; 0 = the most
devices, at most one per core, that divide both batch sizes with at least 16 training examples on
each): the teacher is replicated on every device and training batches and samples are split over them.

A stopped run continues when started again with the same arguments: rows already in <--name>.json
are kept (a file written with other settings is refused), and each training saves its state and
data position every --checkpoint-every steps under <--out>/checkpoints/<training> (cd, pd_8_steps,
...; a checkpoint of other settings, another device count or another teacher is refused), so it
goes on from there with the batches and randomness of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from diffjax import data as data_lib
from diffjax import distill as D
from diffjax import evaluation
from diffjax import processes as P
from diffjax.denoisers import Denoiser, EDMPreconditioned
from diffjax.io import atomic_write_bytes
from diffjax.losses import LogNormal
from diffjax.samplers import DDIM, Karras, Times, sample
from diffjax.training import (
    Checkpointer,
    create_train_state,
    ema,
    eval_metrics,
    load_run,
    make_train_step,
    save_image_grid,
)
from diffjax.training.cpu_devices import cpu_device_count, split_cpu_into_devices, usable_cores
from diffjax.training.cpu_malloc import tune_cpu_malloc
from diffjax.training.images import to_uint8
from diffjax.training.loop import evaluation_split
from diffjax.training.run import config_differences
from experiments.benchmarks.common import RESULTS_DIR, markdown_table, mean_stderr, slug, write_results

METHODS = ("cd", "pd", "scd", "dmd+reg")
NFES = (1, 2, 4)
# CD's intermediate noise levels: 2 NFE through sigma = 0.821 (Song et al. 2023's two-step choice);
# 4 NFE through the interior of EDM's Karras grid (rho 7) of 4 steps from 80 to 0.002.
CD_SIGMAS = {1: (), 2: (0.821,), 4: (17.52, 2.515, 0.1698)}
SCD_WARMUP_FRACTION = 0.1  # sCM's tangent warm-up, as a fraction of the training iterations
PD_START_STEPS = 16  # the teacher's DDIM steps in the first round
TEACHER_STEPS = 49  # + the final denoising = 50 NFE
REGRESSION_WEIGHT = 0.25
SAMPLE_SECONDS: dict[str, float] = {}  # seconds per image after the first (compiling) batch, by label
STEP_SECONDS: dict[str, float] = {}  # seconds per training step after the first (compiling) and saves, by label
# (only for trainings that ran at least 2 steps in this process)


@dataclasses.dataclass(frozen=True)
class Teacher:
    """An EDM-preconditioned teacher: net(params, x, c_noise) is its raw network F (conditioning closed
    over), params its weights, image_shape (H, W, C)."""

    net: Callable
    params: Any
    process: P.GaussianProcess
    sigma_data: float
    image_shape: tuple[int, int, int]

    @property
    def prediction(self) -> EDMPreconditioned:
        return EDMPreconditioned(self.sigma_data)

    def denoiser(self, params=None) -> Denoiser:
        params = self.params if params is None else params
        return Denoiser(lambda x, t: self.net(params, x, t), self.process, self.prediction)

    @property
    def batch_sharding(self) -> NamedSharding | None:
        """Batches split over the data axis of the mesh the parameters are replicated on (`load_run`
        places them on every device); None on one device: everything runs where the parameters are."""
        sharding = jax.tree.leaves(self.params)[0].sharding
        if not isinstance(sharding, NamedSharding) or sharding.mesh.size == 1:
            return None
        return NamedSharding(sharding.mesh, PartitionSpec("data"))


def jit_split(fn, sharding: NamedSharding | None, **options):
    """jax.jit(fn) whose outputs (and so, by propagation, its computation) are split by `sharding`."""
    return jax.jit(fn, **options) if sharding is None else jax.jit(fn, out_shardings=sharding, **options)


def teacher_from_run(loaded) -> Teacher:
    """The Teacher of a `load_run` result (EMA parameters); unconditional through the null class."""
    config = loaded.config
    if not isinstance(loaded.process, P.EDM) or config.loss.prediction != "edm_preconditioned":
        raise SystemExit(
            f"the teacher must be trained on the EDM process with edm_preconditioned prediction, got process "
            f"{loaded.process!r}, prediction {config.loss.prediction!r}"
        )
    if loaded.num_classes and not loaded.run.label_dropout > 0:
        raise SystemExit("a class-conditional teacher needs label dropout (a null class) to be used unconditionally")

    def net(params, x, t):
        return loaded.apply(params, x, t, None)  # no labels: the null class of a conditional model

    return Teacher(net, loaded.ema_params, loaded.process, float(config.loss.sigma_data), tuple(loaded.image_shape))


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------


# the arguments that change what a method's training computes
TRAINING_ARGUMENTS = (
    "iterations",
    "batch_size",
    "lr",
    "ema",
    "pd_start_steps",
    "regression_pairs",
    "regression_weight",
    "sample_batch",  # dmd's regression pairs are made in batches of it
)


def teacher_fingerprint(teacher: Teacher) -> int:
    """A CRC-32 of the teacher's weights: training checkpoints of another teacher are refused."""
    crc = 0
    for leaf in jax.tree.leaves(jax.device_get(teacher.params)):
        crc = zlib.crc32(np.ascontiguousarray(leaf).tobytes(), crc)
    return crc


def training_settings(teacher: Teacher, args, label: str) -> dict:
    """What a training checkpoint must match to be continued."""
    sharding = teacher.batch_sharding
    return {
        "label": label,
        "teacher_crc32": teacher_fingerprint(teacher),
        "devices": 1 if sharding is None else sharding.mesh.size,  # data-parallel sums: another count, other rounding
        **{k: getattr(args, k) for k in TRAINING_ARGUMENTS},
    }


def refuse_other_settings(settings: dict, directory: str) -> Callable[[int, dict], None]:
    def check(step: int, metadata: dict) -> None:
        differ = {k: (metadata.get(k), v) for k, v in settings.items() if metadata.get(k) != v}
        if differ:
            raise SystemExit(
                f"{directory} holds a training checkpoint (step {step}) with other settings "
                f"(saved, now): {differ}; delete it or use another --out"
            )

    return check


def train(loss_fn, params, trainable, args, label, teacher, make_batches, extra=None):
    """args.iterations Adam steps of loss_fn on the image batches; returns (state, seconds, last loss),
    seconds summed over the runs that made it (each one's compile included, `extra`'s time not).
    make_batches() -> a fresh iterator of {"image"} batches with get_state/set_state; extra(i) -> dict:
    more batch entries for step i (e.g. regression pairs). Saves (state, data position) every
    --checkpoint-every steps and at the end under <--out>/checkpoints/<label>, and continues from
    there when run again with the same settings (same batches, same randomness)."""
    optimizer = optax.adam(args.lr, b2=0.99)
    average = ema(args.ema)
    # on the teacher's mesh (create_train_state replicates the state there), the examples split
    state = create_train_state(params, optimizer, 0, average=average, trainable=trainable)
    batch_sharding = teacher.batch_sharding
    step = jax.jit(make_train_step(loss_fn, optimizer, average, trainable=trainable))
    batches = make_batches()
    directory = os.path.join(args.out, "checkpoints", slug(label))
    settings = training_settings(teacher, args, label)
    checkpointer = Checkpointer(directory, keep=1, remove_unfinished=True)
    first, seconds_before, loss = 0, 0.0, float("nan")
    start, steady, save_seconds, extra_seconds, failed = time.perf_counter(), None, 0.0, 0.0, True
    try:
        restored = checkpointer.restore(state, check_metadata=refuse_other_settings(settings, directory))
        if restored is not None:
            state, first = restored.state, restored.step
            batches.set_state(restored.data_state)
            seconds_before, loss = restored.metadata["seconds"], restored.metadata["loss"]
            print(f"{label}: continuing from the checkpoint at step {first} of {args.iterations}", flush=True)
        start = time.perf_counter()
        for i in tqdm(range(first, args.iterations), desc=label, initial=first, total=args.iterations, mininterval=5):
            examples = {"image": next(batches)["image"]}
            if extra is not None:  # data preparation: not training time
                before = time.perf_counter()
                examples.update(extra(i))
                extra_seconds += time.perf_counter() - before
            examples = (
                jax.device_put(examples, batch_sharding) if batch_sharding else jax.tree.map(jnp.asarray, examples)
            )
            state, metrics = step(state, {**examples, "step": state.step})
            loss = float(metrics["loss"])  # waits for the step
            if not np.isfinite(loss):
                raise SystemExit(f"{label}: the loss is {loss} at step {i}")
            if i == first:  # the first step compiles
                steady = time.perf_counter()
            if (i + 1) % args.checkpoint_every == 0 or i + 1 == args.iterations:
                now = time.perf_counter()
                seconds = seconds_before + now - start - extra_seconds
                checkpointer.save(i + 1, state, batches.get_state(), {**settings, "seconds": seconds, "loss": loss})
                save_seconds += time.perf_counter() - now
        failed = False
    finally:  # a save in flight is finished, also when stopped (Ctrl-C), without masking what stopped it
        close_quietly_if(failed, checkpointer.close, batches.close)
    ran = args.iterations - first
    if ran > 1:  # extra's first call (dmd's pairs) came before `steady`
        STEP_SECONDS[label] = (time.perf_counter() - steady - save_seconds) / (ran - 1)
    return state, seconds_before + time.perf_counter() - start - extra_seconds, loss


def close_quietly_if(quiet: bool, *closers: Callable[[], None]) -> None:
    """Call each closer; when `quiet` (an error is on its way out), print their failures instead."""
    for close in closers:
        try:
            close()
        except Exception as err:
            if not quiet:
                raise
            print(f"while stopping: {type(err).__name__}: {err}", flush=True)


def train_cd(teacher: Teacher, args, make_batches):
    """The consistency model's raw-network params."""
    loss = D.consistency_distillation_loss(
        teacher.net,
        teacher.process,
        lambda p: teacher.denoiser(p["teacher"]),
        schedule=D.KarrasDiscretisation(18),
        metric=D.L2(),
        sigma_data=teacher.sigma_data,
    )
    params = {"student": teacher.params, "teacher": teacher.params}
    trainable = {"student": True, "teacher": False}
    state, seconds, last = train(loss, params, trainable, args, "cd", teacher, make_batches)
    return {"student": state.ema_params["student"]}, {"seconds": seconds, "final_loss": last}


def trigflow_time(noise_level: float, sigma_data: float) -> float:
    """The TrigFlow time of EDM's noise level s: t = atan(s / sd)."""
    return math.atan(noise_level / sigma_data)


def trigflow_process(teacher: Teacher) -> D.TrigFlow:
    """TrigFlow with the teacher's sigma_data over the teacher's noise levels (s = sd tan t)."""
    sd, edm = teacher.sigma_data, teacher.process
    return D.TrigFlow(sd, trigflow_time(edm.t_min, sd), trigflow_time(edm.t_max, sd))


def trigflow_teacher(teacher: Teacher, params) -> Denoiser:
    """The EDM teacher (weights `params`) as a denoiser on `trigflow_process`: its EDM preconditioning
    reads x / cos t at s = sd tan t, so its velocity is sCD's dx_t/dt."""
    return Denoiser(lambda x, c: teacher.net(params, x, c), trigflow_process(teacher), teacher.prediction)


def trigflow_net(teacher: Teacher) -> Callable:
    """sCM's raw network F(params, x / sd, t) made of the EDM teacher's F (`scd` in the module docstring)."""
    sd = teacher.sigma_data

    def net(params, x_scaled, t):
        return -teacher.net(params, x_scaled, jnp.log(sd * jnp.tan(t)) / 4.0)

    return net


def train_scd(teacher: Teacher, args, make_batches):
    """The sCM student's raw-network params (TrigFlow, `trigflow_net`)."""
    trig = trigflow_process(teacher)
    weighting = D.AdaptiveWeighting()
    loss = D.scm_loss(
        trigflow_net(teacher),
        trig,
        teacher=lambda p: trigflow_teacher(teacher, p["teacher"]),
        weighting=weighting,
        tangent_warmup=int(SCD_WARMUP_FRACTION * args.iterations),
    )
    params = {"student": teacher.params, "teacher": teacher.params, "weighting": weighting.init()}
    trainable = {"student": True, "teacher": False, "weighting": True}
    state, seconds, last = train(loss, params, trainable, args, "scd", teacher, make_batches)
    return {"student": state.ema_params["student"]}, {"seconds": seconds, "final_loss": last}


def pd_start_times(process, steps: int) -> tuple[float, ...]:
    times = np.asarray(Karras()(process, steps, process.t_min, process.t_max), np.float64)
    return tuple(float(t) for t in times)


def train_pd(teacher: Teacher, args, make_batches):
    """{steps: (params, times)} of the rounds with 4, 2 and 1 steps."""
    times, params, teacher_params = pd_start_times(teacher.process, args.pd_start_steps), teacher.params, teacher.params
    rounds_total = int(args.pd_start_steps).bit_length() - 1  # a power of 2: log2 of the start steps
    per_round = max(args.iterations // rounds_total, 1)
    round_args = argparse.Namespace(**{**vars(args), "iterations": per_round})
    students, seconds, rounds = {}, 0.0, []
    while len(times) > 2:
        loss = D.progressive_distillation_loss(
            teacher.net,
            teacher.process,
            lambda p: teacher.denoiser(p["teacher"]),
            times,
            prediction=teacher.prediction,
            target="x0",
        )
        state, sec, last = train(
            loss,
            {"student": params, "teacher": teacher_params},
            {"student": True, "teacher": False},
            round_args,
            f"pd {(len(times) - 1) // 2} steps",
            teacher,
            make_batches,
        )
        seconds += sec
        params = teacher_params = state.ema_params["student"]
        times = D.student_times(times)
        rounds.append({"steps": len(times) - 1, "final_loss": last})
        if len(times) - 1 in NFES:
            students[len(times) - 1] = (params, times)
    return students, {"seconds": seconds, "rounds": rounds, "iterations_per_round": per_round}


def regression_pairs(teacher: Teacher, num: int, batch_size: int, seed: int):
    """num (noise, teacher sample) pairs, batch_size per compiled call (numpy)."""
    make = jit_split(
        lambda key: D.teacher_ode_pairs(
            teacher.denoiser(), key, (batch_size, *teacher.image_shape), steps=TEACHER_STEPS
        ),
        teacher.batch_sharding,
    )
    noise, samples = [], []
    for i in tqdm(range(-(-num // batch_size)), desc="regression pairs", mininterval=5):
        z, y = make(jax.random.fold_in(jax.random.key(2000 + seed), i))
        noise.append(np.asarray(z))
        samples.append(np.asarray(y))
    return np.concatenate(noise)[:num], np.concatenate(samples)[:num]


def train_dmd(teacher: Teacher, args, make_batches):
    """The one-step generator's params (dmd+reg). The regression pairs are made at the first step that
    needs them (none when a finished training checkpoint is read back); step i draws its pairs with
    its own generator, so a continued training draws what an uninterrupted one would."""
    pairs = {}

    def extra(i):
        if not pairs:
            start = time.perf_counter()
            pairs["noise"], pairs["teacher_sample"] = regression_pairs(
                teacher, args.regression_pairs, args.sample_batch, 0
            )
            pairs["seconds"] = time.perf_counter() - start
        index = np.random.default_rng((0, i)).integers(0, args.regression_pairs, args.batch_size)
        return {k: pairs[k][index] for k in ("noise", "teacher_sample")}

    loss = D.dmd_loss(
        teacher.net,
        teacher.net,
        teacher.process,
        lambda p: teacher.denoiser(p["teacher"]),
        generator_prediction=teacher.prediction,
        fake_prediction=teacher.prediction,
        time_sampler=LogNormal(),
        regression_weight=args.regression_weight,
        regression_pairs=D.PairsFromBatch(),
    )
    params = {"generator": teacher.params, "fake": teacher.params, "teacher": teacher.params}
    trainable = {"generator": True, "fake": True, "teacher": False}
    state, seconds, last = train(loss, params, trainable, args, "dmd+reg", teacher, make_batches, extra)
    info = {
        "seconds": seconds,
        "final_loss": last,
        "pair_seconds": pairs.get("seconds"),  # None: made by an earlier run (or not needed)
        "regression_pairs": args.regression_pairs,
        "regression_weight": args.regression_weight,
    }
    return {"generator": state.ema_params["generator"]}, info


# ------------------------------------------------------------------------------------------------
# sampling: generate(key, n) -> images in [-1, 1], per (method, NFE)
# ------------------------------------------------------------------------------------------------


def consistency_generator(consistency: Denoiser, grid: Times, nfe: int, image_shape):
    """Multistep consistency sampling of a consistency function's denoiser through `grid`."""

    def generate(key, n):
        shape = (n, *image_shape)
        solver = D.ConsistencySampler()
        return sample(consistency, key, shape, solver=solver, steps=nfe, grid=grid, denoise_final=False).samples

    return generate


def cd_generator(teacher: Teacher, params, nfe: int):
    cm = D.ConsistencyFunction(lambda x, c: teacher.net(params, x, c), teacher.process, teacher.sigma_data)
    grid = D.consistency_grid(teacher.process, CD_SIGMAS[nfe])
    return consistency_generator(cm.denoiser(), grid, nfe, teacher.image_shape)


def scd_generator(teacher: Teacher, params, nfe: int):
    trig, net, sd = trigflow_process(teacher), trigflow_net(teacher), teacher.sigma_data
    cm = D.TrigFlowConsistency(lambda x, t: net(params, x, t), sd)
    grid = D.consistency_grid(trig, [trigflow_time(s, sd) for s in CD_SIGMAS[nfe]])
    return consistency_generator(cm.denoiser(trig), grid, nfe, teacher.image_shape)


def pd_generator(teacher: Teacher, params, times):
    def generate(key, n):
        shape = (n, *teacher.image_shape)
        den = teacher.denoiser(params)
        return sample(
            den, key, shape, solver=DDIM(), steps=len(times) - 1, grid=Times(times), denoise_final=False
        ).samples

    return generate


def dmd_generator(teacher: Teacher, params):
    def generate(key, n):
        z = teacher.process.prior_sample(key, (n, *teacher.image_shape))
        return teacher.denoiser(params).x0(z, teacher.process.t_max)

    return generate


def teacher_generator(teacher: Teacher):
    def generate(key, n):
        return sample(teacher.denoiser(), key, (n, *teacher.image_shape), steps=TEACHER_STEPS).samples

    return generate


def student_generators(method: str, teacher: Teacher, trained) -> dict[int, Callable]:
    if method == "cd":
        return {nfe: cd_generator(teacher, trained["student"], nfe) for nfe in NFES}
    if method == "scd":
        return {nfe: scd_generator(teacher, trained["student"], nfe) for nfe in NFES}
    if method == "pd":
        return {steps: pd_generator(teacher, p, times) for steps, (p, times) in sorted(trained.items())}
    return {1: dmd_generator(teacher, trained["generator"])}


def generate_images(generate, num: int, key, batch_size: int, label: str, sharding=None) -> np.ndarray:
    """num uint8 images, batch_size per compiled call (key folded with the batch index), split by
    `sharding` (None: one device)."""
    jitted = jit_split(generate, sharding, static_argnums=1)
    chunks, start = [], time.perf_counter()
    for i in tqdm(range(-(-num // batch_size)), desc=label, mininterval=5):
        chunks.append(to_uint8(jitted(jax.random.fold_in(key, i), batch_size)))
        if i == 0:
            start = time.perf_counter()  # the first batch compiles
    if len(chunks) > 1:
        SAMPLE_SECONDS[label] = (time.perf_counter() - start) / ((len(chunks) - 1) * batch_size)
    return np.concatenate(chunks)[:num]


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------


def markdown(rows, meta) -> str:
    seeds = meta["seeds"]
    headers = ["method", "NFE"] + [f"FID seed {s}" for s in seeds] + ["FID mean ± s.e.", "KID x1e3 mean"]
    headers += ["training s", "sampling s / 1k"]
    body = []
    for r in sorted(rows, key=lambda r: r["method"] != "teacher"):  # the teacher first (a stable sort)
        body.append(
            [r["method"], r["nfe"]]
            + [f"{f:.2f}" for f in r["fid"]]
            + [f"{r['fid_mean']:.2f} ± {r['fid_stderr']:.2f}", f"{r['kid_x1e3_mean']:.2f}"]
            + [f"{r['training_seconds']:.0f}", f"{r['sampling_seconds_per_1k']:.1f}"]
        )
    progress = (
        "" if len(rows) >= rows_expected(meta) else f"In progress: {len(rows)} of {rows_expected(meta)} rows.\n\n"
    )
    return (
        f"# Few-step students of a trained teacher ({meta['teacher']}, step {meta['teacher_step']})\n\n{progress}"
        f"FID of {meta['samples']} samples per seed vs the first {meta['reference_images']} images of the "
        f"{meta['split']!r} split (small-sample FID is biased upwards: compare rows). Students: the teacher's "
        f"architecture initialised from its EMA parameters, {meta['iterations']} Adam steps (lr {meta['lr']}, "
        f"beta2 0.99, batch {meta['batch_size']}, EMA {meta['ema']}; pd: split over its rounds from "
        f"{meta['pd_start_steps']} steps); "
        f"dmd+reg: {meta['regression_pairs']} regression pairs, weight {meta['regression_weight']}. "
        "Teacher: the default solver (UniPC), 49 steps + the final denoising. "
        "See experiments/distill_mnist.py for each method's settings.\n\n" + markdown_table(headers, body) + "\n"
    )


def fid_row(method, nfe, generate, training_seconds, *, args, reference, inception, grid_dir, sharding=None):
    fids, kids, seconds = [], [], []
    for seed in args.seeds:
        start = time.perf_counter()
        label = f"{method} NFE {nfe} seed {seed}"
        images = generate_images(generate, args.samples, jax.random.key(seed), args.sample_batch, label, sharding)
        seconds.append(time.perf_counter() - start)
        if seed == args.seeds[0] and grid_dir:
            save_image_grid(
                images[:64].astype(np.float32) / 127.5 - 1.0, os.path.join(grid_dir, f"{slug(method)}_nfe{nfe}.png")
            )
        quality = eval_metrics.sample_quality(images, reference, inception, batch_size=args.sample_batch)
        fids.append(quality["fid"])
        kids.append(quality["kid_x1e3"])
        print(f"{method} NFE {nfe} seed {seed}: FID {quality['fid']:.2f}", flush=True)
    mean, stderr = mean_stderr(fids)
    return {
        "method": method,
        "nfe": nfe,
        "seeds": list(args.seeds),
        "fid": fids,
        "fid_mean": mean,
        "fid_stderr": stderr,
        "kid_x1e3": kids,
        "kid_x1e3_mean": float(np.mean(kids)),
        "training_seconds": training_seconds,
        "sampling_seconds": seconds,
        "sampling_seconds_per_1k": 1000.0 * float(np.mean(seconds)) / args.samples,
        "steady_sampling_seconds_per_1k": 1000.0
        * SAMPLE_SECONDS.get(f"{method} NFE {nfe} seed {args.seeds[-1]}", np.nan),
    }


def save_params(path: str, params) -> None:
    atomic_write_bytes(path, serialization.to_bytes(jax.device_get(params)))


def method_nfes(method: str, pd_start_steps: int) -> tuple[int, ...]:
    """The NFE of `method`'s rows (pd: the rounds' step counts among NFES)."""
    if method == "dmd+reg":
        return (1,)
    if method == "pd":
        return tuple(nfe for nfe in NFES if nfe < pd_start_steps)
    return NFES


def rows_expected(meta: dict) -> int:
    return meta["teacher_row"] + sum(len(method_nfes(m, meta["pd_start_steps"])) for m in meta["methods"])


def previous_results(args, meta: dict) -> tuple[list, dict]:
    """(rows, training) of <--results-dir>/<--name>.json written with the same settings, so that a stopped
    run continues; ([], {}) when there is none. Refuses a file written with other settings; other methods
    may be asked for (meta's methods become both lists)."""
    path = os.path.join(args.results_dir, f"{args.name}.json")
    if not os.path.exists(path):
        return [], {}
    with open(path) as f:
        previous = json.load(f)

    def comparable(m):  # as written to JSON; what may grow between runs, and the teacher's path, left out
        ignored = ("methods", "teacher_row", "teacher")
        return {k: v for k, v in json.loads(json.dumps(m, default=str)).items() if k not in ignored}

    differences = config_differences(comparable(previous["meta"]), comparable(meta))
    if differences:
        raise SystemExit(f"{path} was written with other settings ({differences}); use another --name or delete it")
    meta["methods"] = list(dict.fromkeys([*previous["meta"]["methods"], *meta["methods"]]))  # the rows of both
    meta["teacher_row"] = meta["teacher_row"] or previous["meta"]["teacher_row"]
    print(f"continuing {path}: {len(previous['rows'])} rows done", flush=True)
    return previous["rows"], previous["training"]


TRAINERS = {"cd": train_cd, "pd": train_pd, "scd": train_scd, "dmd+reg": train_dmd}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--teacher",
        required=True,
        help="the trained run directory, or its weights file (save_run_weights); EDM, edm_preconditioned",
    )
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {list(METHODS)}")
    parser.add_argument("--iterations", type=int, default=4000, help="training steps per method (pd: all rounds)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument(
        "--pd-start-steps", type=int, default=PD_START_STEPS, help="pd's first teacher grid (a power of 2)"
    )
    parser.add_argument("--regression-weight", type=float, default=REGRESSION_WEIGHT)
    parser.add_argument("--regression-pairs", type=int, default=2000, help="dmd+reg's (noise, teacher sample) pairs")
    parser.add_argument("--samples", type=int, default=2000, help="samples per row and seed")
    parser.add_argument("--seeds", default="0,1,2", help="sampling seeds, comma-separated")
    parser.add_argument("--sample-batch", type=int, default=250, help="images per compiled sampling call")
    parser.add_argument("--reference-images", type=int, default=10000)
    parser.add_argument("--name", default="distill_mnist")
    parser.add_argument("--out", default="work/distill_mnist", help="student parameters")
    parser.add_argument("--results-dir", default=RESULTS_DIR, help="where the table and the grids go")
    parser.add_argument(
        "--checkpoint-every", type=int, default=250, help="training steps between checkpoints (<--out>/checkpoints)"
    )
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=0,
        help="devices to split the CPU into, the batches split over them (0: chosen from the cores and batch sizes)",
    )
    parser.add_argument("--no-teacher-row", action="store_true", help="skip the teacher's 50-NFE row")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    methods = list(dict.fromkeys(m for m in args.methods.split(",") if m))
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    args.methods = methods
    for name in (
        "iterations",
        "batch_size",
        "checkpoint_every",
        "samples",
        "sample_batch",
        "reference_images",
        "regression_pairs",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.pd_start_steps < 2 or args.pd_start_steps & (args.pd_start_steps - 1):
        parser.error(f"--pd-start-steps must be a power of 2 >= 2, got {args.pd_start_steps}")
    if not args.seeds:
        parser.error("--seeds needs at least one seed")
    return args


def main(argv=None):
    print(tune_cpu_malloc(), flush=True)  # before JAX starts
    args = parse_args(argv)
    devices = cpu_device_count(args.cpu_devices, args.batch_size, args.sample_batch, (-1, 1, 1), usable_cores())
    print(split_cpu_into_devices(devices), flush=True)  # before JAX starts too
    loaded = load_run(args.teacher)  # the parameters replicated on every device
    teacher = teacher_from_run(loaded)
    devices = jax.device_count()
    for name in ("batch_size", "sample_batch"):
        if getattr(args, name) % devices:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)} must divide over the {devices} devices")
    config = loaded.config
    split = evaluation_split(data_lib.dataset_info(config.data))

    def make_batches():
        return data_lib.make_iterator(
            config.data, split="train", global_batch_size=args.batch_size, seed=0, shuffle=True
        )

    os.makedirs(args.out, exist_ok=True)
    grid_dir = os.path.join(args.results_dir, f"{args.name}_grids")
    os.makedirs(grid_dir, exist_ok=True)
    meta = {
        "teacher": args.teacher,  # as given; the weights' CRC-32 is what a continued run must match
        "teacher_crc32": teacher_fingerprint(teacher),
        "teacher_step": int(loaded.step),
        "split": split,
        **{k: getattr(args, k) for k in ("iterations", "batch_size", "lr", "ema", "samples", "seeds", "sample_batch")},
        "devices": devices,  # data-parallel sums: another count, other rounding
        **{
            k: getattr(args, k)
            for k in ("reference_images", "regression_pairs", "regression_weight", "methods", "pd_start_steps")
        },
        "cd_sigmas": {str(k): v for k, v in CD_SIGMAS.items()},
        "scd_tangent_warmup_fraction": SCD_WARMUP_FRACTION,
        "teacher_row": not args.no_teacher_row,
    }
    rows, training = previous_results(args, meta)
    done = {(row["method"], row["nfe"]) for row in rows}
    inception = evaluation.load_inception_params(config.eval.inception_weights or None)
    reference = eval_metrics.reference_for_split(
        config.data, split, args.reference_images, inception, batch_size=args.sample_batch
    )

    evaluate = functools.partial(
        fid_row,
        args=args,
        reference=reference,
        inception=inception,
        grid_dir=grid_dir,
        sharding=teacher.batch_sharding,
    )

    def write():
        text = markdown(rows, meta)
        write_results(args.name, {"meta": meta, "rows": rows, "training": training}, text, directory=args.results_dir)
        return text

    for method in args.methods:
        if all((method, nfe) in done for nfe in method_nfes(method, args.pd_start_steps)):
            print(f"{method}: its rows are in the results already", flush=True)
            continue
        trained, info = TRAINERS[method](teacher, args, make_batches)
        previous = training.get(method, {})  # what a training read back finished cannot measure again
        steady = dict(STEP_SECONDS) or previous.get("steady_seconds_per_step", {})
        info = {**previous, **{k: v for k, v in info.items() if v is not None}, "steady_seconds_per_step": steady}
        training[method] = info
        STEP_SECONDS.clear()
        kept = {f"steps_{k}": v[0] for k, v in trained.items()} if method == "pd" else trained
        save_params(os.path.join(args.out, f"{slug(method)}.msgpack"), kept)
        for nfe, generate in student_generators(method, teacher, trained).items():
            if (method, nfe) in done:
                continue
            rows.append(evaluate(method, nfe, generate, info["seconds"]))
            write()
    if not args.no_teacher_row and ("teacher", 50) not in done:  # last: the students' rows come sooner
        rows.append(evaluate("teacher", 50, teacher_generator(teacher), 0.0))
        write()
    print(write())


if __name__ == "__main__":
    main()

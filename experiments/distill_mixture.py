"""Few-step students of an EXACT teacher on a 4-D Gaussian mixture: how close 1 and 2 steps get.

Data: 4 isotropic Gaussians in 4-D, means 0.75 x the rows of the 4x4 Hadamard matrix, stds 0.05,
0.1, 0.25, 0.5, weights 0.1, 0.2, 0.3, 0.4 (the 4-D version of the sampler-accuracy mixture). The
teacher is the mixture's exact denoiser (`GaussianMixture.denoiser`). Students are small residual
MLPs (`diffjax.models.ToyMLP`) trained with `diffjax.training.make_train_step`:

    cd        consistency distillation on EDM, one DDIM step of the teacher, Karras grid, L2
    ct-ict    consistency training from data on EDM, iCT schedule, pseudo-Huber
    ct-ect    consistency training from data on EDM, ECT schedule, pseudo-Huber
    scd       sCM distillation on TrigFlow (teacher velocity, jvp tangent, normalisation, adaptive
              weighting, tangent warm-up over the first fifth; ToyMLP time_scale 10 instead of 100)
    sct       sCM training from data on TrigFlow
    pd        progressive distillation on TrigFlow, DDIM 16 -> 8 -> 4 -> 2 -> 1 steps, v target
    meanflow  MeanFlow from data on flow matching (u(x, t, r): t embedded, t - r a fifth input)
    meanflow-d  MeanFlow with the teacher's velocity in place of the conditional one
    shortcut  shortcut model from data on flow matching (same network)
    dmd       distribution matching on EDM: a one-step generator (EDM-preconditioned MLP at sigma_max)
              and an online fake denoiser (EDM-preconditioned MLP), log-normal matching times
    dmd+reg   dmd with DMD's regression term: weight --regression-weight (DMD's 0.25), L2, pairs from a
              dataset of REGRESSION_PAIRS (noise, teacher sample) made once by `teacher_ode_pairs`
              (the default solver, 49 steps + the final denoising: the "teacher, 50 NFE" row),
              a batch of pairs per step
    dmd+gan   dmd with DMD2's GAN term: a discriminator MLP (same size; logit = mean of its outputs
              at c_in x_t, c_noise as EDM), gan_weight each of --gan-weights, discriminator_weight 1, on the
              batch's mixture samples (no two-time-scale update: one step updates all three)

Each student is sampled with 1 and 2 network evaluations (`ConsistencySampler`; DDIM on its grid
for pd; `AverageVelocityJump` for meanflow and shortcut); the mixture-weight error (sum
|w_hat - w|) and the worst relative std error (`GaussianMixture.sample_errors`, as
experiments/benchmarks/sampler_accuracy.py) are compared with the data itself (the sampling-noise
floor) and the teacher at 50 NFE (the default solver).

    python -m experiments.distill_mixture                 # all methods (minutes per method on 2 CPUs)
    python -m experiments.distill_mixture --iterations 300 --samples 5000 --no-write   # smoke run
    python -m experiments.distill_mixture --iterations 4000 --methods dmd,dmd+reg,dmd+gan --append
                                          # the DMD rows only, merged into the saved table

Writes experiments/results/distill_mixture.{json,md} via experiments/benchmarks/common.py.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from diffjax import distill as D
from diffjax import processes as P
from diffjax.data.toy import GaussianMixture
from diffjax.denoisers import Denoiser, EDMPreconditioned
from diffjax.distill.progressive import progressive_distillation_loss, student_times
from diffjax.io import atomic_write_text
from diffjax.losses import LogNormal
from diffjax.models import ToyMLP, ToyMLPConfig, functional
from diffjax.samplers import DDIM, Times, Uniform, sample
from diffjax.training import create_train_state, ema, make_train_step
from experiments.benchmarks.common import RESULTS_DIR, markdown_table, write_results

METHODS = (
    "cd",
    "ct-ict",
    "ct-ect",
    "scd",
    "sct",
    "pd",
    "meanflow",
    "meanflow-d",
    "shortcut",
    "dmd",
    "dmd+reg",
    "dmd+gan",
)
EDM = P.EDM()
TRIG = D.TrigFlow(sigma_data=0.5)
FM = P.FlowMatching()
# cd, ct and sCM train with Adam(3e-4, beta2 = 0.99) (CM papers use beta2 = 0.99 and small rates);
# at the default 1e-3 / 0.999 sCD collapsed onto one component.
CONSISTENCY_ADAM = {"learning_rate": 3e-4, "b2": 0.99}
EDM_MID, TRIG_MID, FM_MID = 0.8, 1.1, 0.5  # the intermediate time of 2-step sampling
REGRESSION_WEIGHT, REGRESSION_PAIRS = 0.25, 20000  # DMD's lambda_reg; the size of the pairs dataset
GAN_WEIGHTS = "0.01,0.1,1"  # the generator's GAN term: dmd+gan has a row for each
SETTINGS = ("iterations", "batch", "lr", "ema", "samples", "seed")  # what --append must match


def mixture_4d() -> GaussianMixture:
    hadamard = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], np.float64)
    return GaussianMixture.create([0.1, 0.2, 0.3, 0.4], 0.75 * hadamard, [0.05, 0.1, 0.25, 0.5])


def new_mlp(seed: int, time_scale: float = 100.0):
    model = ToyMLP(ToyMLPConfig(data_dim=4, width=128, depth=3, time_scale=time_scale), rngs=nnx.Rngs(seed))
    apply, params = functional(model)
    return (lambda p, x, t: apply(p, x, t)), params


def new_two_time_mlp(seed: int):
    """u(x, t, r) for MeanFlow / shortcut models: a ToyMLP embedding t, with t - r as a fifth input."""
    model = ToyMLP(ToyMLPConfig(data_dim=5, width=128, depth=3, time_scale=100.0), rngs=nnx.Rngs(seed))
    apply, params = functional(model)

    def net(p, x, t, r):
        return apply(p, jnp.concatenate([x, (t - r)[:, None]], axis=1), t)[:, :4]

    return net, params


def train(loss_fn, params, trainable, args, label, seed, consistency=False, extra=None):
    """`args.iterations` Adam steps of `loss_fn` on fresh mixture batches; returns (state, seconds, last loss).
    consistency: the consistency-model optimizer instead (CONSISTENCY_ADAM: lower rate, beta2 = 0.99).
    extra(key) -> dict: more batch entries per step (e.g. regression pairs)."""
    mixture = mixture_4d()
    optimizer = optax.adam(**CONSISTENCY_ADAM) if consistency else optax.adam(args.lr)
    average = ema(args.ema)
    state = create_train_state(params, optimizer, seed, average=average, trainable=trainable)
    step = jax.jit(make_train_step(loss_fn, optimizer, average, trainable=trainable))
    draw = jax.jit(lambda k: {"image": mixture.sample(k, args.batch), **({} if extra is None else extra(k))})
    key = jax.random.key(1000 + seed)
    start, losses = time.perf_counter(), []
    for i in tqdm(range(args.iterations), desc=label, leave=False, mininterval=5):
        state, metrics = step(state, {**draw(jax.random.fold_in(key, i)), "step": state.step})
        if i >= args.iterations - 100:
            losses.append(float(metrics["loss"]))
    return state, time.perf_counter() - start, float(np.mean(losses))


def errors(x) -> dict:
    weight_error, std_error = mixture_4d().sample_errors(x)
    return {"weight_error": weight_error, "std_error": std_error}


def consistency_samples(denoiser, process, mid, nfe, key, n):
    grid = D.consistency_grid(process, () if nfe == 1 else (mid,))
    result = sample(denoiser, key, (n, 4), solver=D.ConsistencySampler(), steps=nfe, grid=grid, denoise_final=False)
    return result.samples


def run_consistency(method, args, seed):
    apply, params = new_mlp(seed)
    mixture = mixture_4d()
    if method == "cd":
        loss = D.consistency_distillation_loss(
            apply, EDM, mixture.denoiser(EDM), schedule=D.KarrasDiscretisation(18), metric=D.L2()
        )
    elif method == "ct-ict":
        schedule = D.ImprovedDiscretisation(total_iterations=args.iterations, s0=10, s1=160)
        loss = D.consistency_training_loss(apply, EDM, schedule=schedule, metric=D.PseudoHuber())
    else:
        schedule = D.EasyDiscretisation(stage_iterations=max(args.iterations // 6, 1))
        loss = D.consistency_training_loss(apply, EDM, schedule=schedule, metric=D.PseudoHuber())
    state, seconds, last = train(loss, {"student": params}, None, args, method, seed, consistency=True)
    student = state.ema_params["student"]
    cm = D.ConsistencyFunction(lambda x, c: apply(student, x, c), EDM).denoiser()
    return {nfe: consistency_samples(cm, EDM, EDM_MID, nfe, jax.random.key(seed), args.samples) for nfe in (1, 2)}, {
        "seconds": seconds,
        "final_loss": last,
    }


def run_scm(method, args, seed):
    apply, params = new_mlp(seed, time_scale=10.0)  # sCM: a small time-embedding scale keeps d F / dt tame
    weighting = D.AdaptiveWeighting()
    teacher = mixture_4d().denoiser(TRIG) if method == "scd" else None
    loss = D.scm_loss(apply, TRIG, teacher=teacher, weighting=weighting, tangent_warmup=max(args.iterations // 5, 1))
    state, seconds, last = train(
        loss, {"student": params, "weighting": weighting.init()}, None, args, method, seed, consistency=True
    )
    student = state.ema_params["student"]
    cm = D.TrigFlowConsistency(lambda x, t: apply(student, x, t), TRIG.sigma_data).denoiser(TRIG)
    return {nfe: consistency_samples(cm, TRIG, TRIG_MID, nfe, jax.random.key(seed), args.samples) for nfe in (1, 2)}, {
        "seconds": seconds,
        "final_loss": last,
    }


def run_average_velocity(method, args, seed):
    apply, params = new_two_time_mlp(seed)
    if method == "shortcut":
        loss = D.shortcut_loss(apply, FM)
    else:
        loss = D.meanflow_loss(apply, FM, teacher=mixture_4d().denoiser(FM) if method == "meanflow-d" else None)
    state, seconds, last = train(loss, {"student": params}, None, args, method, seed)
    student = state.ema_params["student"]
    model = D.AverageVelocity(lambda x, t, r: apply(student, x, t, r)).denoiser(FM)
    out = {}
    for nfe, times in ((1, (FM.t_max, FM.t_min)), (2, (FM.t_max, FM_MID, FM.t_min))):
        result = sample(
            model,
            jax.random.key(seed),
            (args.samples, 4),
            solver=D.AverageVelocityJump(),
            steps=nfe,
            grid=Times(times),
            denoise_final=False,
        )
        out[nfe] = result.samples
    return out, {"seconds": seconds, "final_loss": last}


def run_dmd(method, args, seed, gan_weight=None):
    """dmd, dmd+reg (regression pairs from a dataset made once) or dmd+gan (a discriminator MLP,
    generator GAN weight gan_weight)."""
    generator_apply, generator_params = new_mlp(seed)
    fake_apply, fake_params = new_mlp(seed + 1)
    preconditioned = EDMPreconditioned(0.5)
    teacher = mixture_4d().denoiser(EDM)
    params = {"generator": generator_params, "fake": fake_params}
    options, extra, info = {}, None, {}
    if method == "dmd+reg":
        noise, teacher_samples = D.teacher_ode_pairs(
            teacher, jax.random.key(2000 + seed), (REGRESSION_PAIRS, 4), steps=49
        )
        options = {"regression_weight": args.regression_weight, "regression_pairs": D.PairsFromBatch()}
        info = {
            "regression_weight": args.regression_weight,
            "regression_pairs": REGRESSION_PAIRS,
            **{f"pairs_{k}": v for k, v in errors(teacher_samples).items()},  # the dataset vs the data
        }

        def extra(key):
            index = jax.random.randint(jax.random.fold_in(key, 1), (args.batch,), 0, REGRESSION_PAIRS)
            return {"noise": noise[index], "teacher_sample": teacher_samples[index]}

    elif method == "dmd+gan":
        disc_apply, params["discriminator"] = new_mlp(seed + 2)

        def discriminator(p, x_t, t):  # EDM's input scaling and noise embedding, one logit per example
            c_in = 1.0 / jnp.sqrt(t**2 + 0.25)
            return jnp.mean(disc_apply(p, c_in[:, None] * x_t, jnp.log(t) / 4.0), axis=1)

        options = {"gan_weight": gan_weight, "discriminator_fn": discriminator}
        info = {"gan_weight": gan_weight, "discriminator_weight": 1.0}
    loss = D.dmd_loss(
        generator_apply,
        fake_apply,
        EDM,
        teacher,
        generator_prediction=preconditioned,
        fake_prediction=preconditioned,
        time_sampler=LogNormal(),
        **options,
    )
    state, seconds, last = train(loss, params, None, args, method, seed, extra=extra)
    gen = Denoiser(lambda x, t: generator_apply(state.ema_params["generator"], x, t), EDM, preconditioned)
    z = EDM.prior_sample(jax.random.key(seed), (args.samples, 4))
    return {1: gen.x0(z, EDM.t_max)}, {"seconds": seconds, "final_loss": last, **info}


def run_pd(args, seed):
    """Rounds 16 -> 8 -> 4 -> 2 -> 1 DDIM steps; each student starts from the previous one."""
    apply, params = new_mlp(seed)
    teacher = mixture_4d().denoiser(TRIG)
    inner = np.asarray(Uniform()(TRIG, 16, TRIG.t_min, TRIG.t_max))[1:-1]
    times = (TRIG.t_max, *(float(t) for t in inner), TRIG.t_min)
    out, seconds, rounds = {}, 0.0, []
    per_round = max(args.iterations // 4, 1)
    round_args = argparse.Namespace(**{**vars(args), "iterations": per_round})
    while len(times) > 2:
        loss = progressive_distillation_loss(apply, TRIG, teacher, times, prediction="v", target="v")
        state, sec, last = train(loss, {"student": params}, None, round_args, f"pd {len(times) // 2}", seed)
        seconds += sec
        params = state.ema_params["student"]
        teacher = _student_denoiser(apply, params)
        times = student_times(times)
        steps = len(times) - 1
        rounds.append({"steps": steps, "final_loss": last})
        if steps <= 2:
            result = sample(
                teacher,
                jax.random.key(seed),
                (args.samples, 4),
                solver=DDIM(),
                steps=steps,
                grid=Times(times),
                denoise_final=False,
            )
            out[steps] = result.samples
    return out, {"seconds": seconds, "rounds": rounds, "iterations_per_round": per_round}


def _student_denoiser(apply, params):
    return Denoiser(lambda x, t: apply(params, x, t), TRIG, "v")


def load_for_append(meta) -> dict:
    """The saved results, checked (before any training) to have been run with the same settings."""
    with open(os.path.join(RESULTS_DIR, "distill_mixture.json")) as f:
        saved = json.load(f)
    theirs, ours = ({k: m[k] for k in SETTINGS} for m in (saved["meta"], meta))
    if theirs != ours:
        raise SystemExit(f"--append needs the saved run's settings {theirs}, got {ours}")
    if (saved["meta"]["teacher_weight"], saved["meta"]["teacher_std"]) != (meta["teacher_weight"], meta["teacher_std"]):
        print(
            "note: the EDM teacher row recomputed now differs from the saved one "
            f"({meta['teacher_weight']:.4f}, {meta['teacher_std']:.2%} vs {saved['meta']['teacher_weight']:.4f}, "
            f"{saved['meta']['teacher_std']:.2%}); the saved reference rows are kept",
            flush=True,
        )
    return saved


def markdown(rows, meta) -> str:
    headers = ["method", "process", "learns from", "NFE", "weight error", "worst std error", "vs teacher (weight, std)"]
    teachers = {r["process"]: r for r in rows if r["method"] == "teacher, 50 NFE"}
    body = []
    for r in rows:
        ref = teachers.get(r["process"], {"weight_error": meta["teacher_weight"], "std_error": meta["teacher_std"]})
        diff = (
            ""
            if r.get("reference")
            else f"{r['weight_error'] - ref['weight_error']:+.3f}, {r['std_error'] - ref['std_error']:+.2%}"
        )
        body.append(
            [
                r["method"],
                r["process"],
                r["source"],
                r["nfe"],
                f"{r['weight_error']:.3f}",
                f"{r['std_error']:.2%}",
                diff,
            ]
        )
    return (
        "# Few-step students of an exact teacher (4-D Gaussian mixture)\n\n"
        f"{meta['samples']} samples per row; students: ToyMLP width 128, depth 3, {meta['iterations']} Adam steps "
        f"(lr {meta['lr']}, batch {meta['batch']}, EMA {meta['ema']}; cd, ct, scd, sct: Adam lr "
        f"{CONSISTENCY_ADAM['learning_rate']}, beta2 {CONSISTENCY_ADAM['b2']}; pd: the steps split over its 4 rounds), "
        f"seed {meta['seed']}; 2-step sampling goes through t = {EDM_MID} (EDM) / {TRIG_MID} (TrigFlow) / "
        f"{FM_MID} (flow matching); "
        "weight error = sum |w_hat - w|, std error = worst |s_hat/s - 1| over components "
        "(`GaussianMixture.sample_errors`; nan: a component got no sample). The last column subtracts the "
        "teacher at 50 NFE on the same process "
        "(exact denoiser, default solver)."
        + "".join(
            f" Rows {', '.join(a['methods'])} were added on {a['date']} by `--append` (same settings; the "
            "reference rows are the first run's)."
            for a in meta.get("appended", [])
        )
        + "\n\n"
        + markdown_table(headers, body)
        + "\n"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--regression-weight", type=float, default=REGRESSION_WEIGHT, help="dmd+reg's weight")
    parser.add_argument(
        "--gan-weights", default=GAN_WEIGHTS, help="dmd+gan's generator GAN weights, comma-separated: a row for each"
    )
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--markdown-only", action="store_true", help="rebuild the .md from the saved .json")
    parser.add_argument(
        "--append", action="store_true", help="replace only these methods' rows in the saved .json (same settings)"
    )
    args = parser.parse_args()
    if args.markdown_only:
        with open(os.path.join(RESULTS_DIR, "distill_mixture.json")) as f:
            saved = json.load(f)
        atomic_write_text(os.path.join(RESULTS_DIR, "distill_mixture.md"), markdown(saved["rows"], saved["meta"]))
        return
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {list(METHODS)}")
    mixture = mixture_4d()
    key = jax.random.key(args.seed)
    rows = [
        {
            "method": "data (sampling noise floor)",
            "process": "-",
            "source": "-",
            "nfe": 0,
            "reference": True,
            **errors(mixture.sample(jax.random.fold_in(key, 7), args.samples)),
        },
    ]
    for name, process in (("EDM", EDM), ("TrigFlow", TRIG), ("FlowMatching", FM)):
        x = sample(mixture.denoiser(process), key, (args.samples, 4), steps=49).samples
        rows.append(
            {
                "method": "teacher, 50 NFE",
                "process": name,
                "source": "exact denoiser",
                "nfe": 50,
                "reference": True,
                **errors(x),
            }
        )
    teacher16 = sample(
        mixture.denoiser(TRIG), key, (args.samples, 4), solver=DDIM(), steps=16, grid=Uniform(), denoise_final=False
    ).samples
    rows.append(
        {
            "method": "teacher, DDIM 16 (PD's start)",
            "process": "TrigFlow",
            "source": "exact denoiser",
            "nfe": 16,
            "reference": True,
            **errors(teacher16),
        }
    )
    for nfe in (1, 2):
        grid = () if nfe == 1 else (EDM_MID,)
        x = consistency_samples(mixture.denoiser(EDM), EDM, EDM_MID, nfe, key, args.samples)
        rows.append(
            {
                "method": "teacher's x0 as a consistency model",
                "process": "EDM",
                "source": "exact denoiser",
                "nfe": nfe,
                "reference": True,
                "grid": list(grid),
                **errors(x),
            }
        )
    meta = {k: getattr(args, k) for k in SETTINGS}
    meta["teacher_weight"], meta["teacher_std"] = rows[1]["weight_error"], rows[1]["std_error"]
    saved = load_for_append(meta) if args.append else None
    details = {}
    gan_weights = [float(w) for w in args.gan_weights.split(",") if w]
    runs = [(m, w) for m in methods for w in (gan_weights if m == "dmd+gan" else [None])]
    for method, gan_weight in runs:
        if method in ("cd", "ct-ict", "ct-ect"):
            samples, info = run_consistency(method, args, args.seed)
            process, source = "EDM", "exact teacher" if method == "cd" else "data"
        elif method in ("scd", "sct"):
            samples, info = run_scm(method, args, args.seed)
            process, source = "TrigFlow", "exact teacher" if method == "scd" else "data"
        elif method == "pd":
            samples, info = run_pd(args, args.seed)
            process, source = "TrigFlow", "exact teacher (DDIM 16)"
        elif method.startswith("dmd"):
            samples, info = run_dmd(method, args, args.seed, gan_weight)
            process = "EDM"
            source = {
                "dmd+reg": f"exact teacher + its ODE pairs (weight {args.regression_weight:g})",
                "dmd+gan": f"exact teacher + data (GAN, weight {gan_weight:g})" if gan_weight is not None else "",
            }.get(method, "exact teacher")
        else:
            samples, info = run_average_velocity(method, args, args.seed)
            process, source = "FlowMatching", "exact teacher" if method == "meanflow-d" else "data"
        label = method if gan_weight is None else f"{method} (gan_weight {gan_weight:g})"
        details[label] = info
        for nfe, x in samples.items():
            row = {"method": method, "process": process, "source": source, "nfe": nfe, **errors(x)}
            rows.append(row)
            print(
                f"{label:8s} NFE {nfe}: weight {row['weight_error']:.3f}  std {row['std_error']:.2%}  "
                f"({info['seconds']:.0f}s training)",
                flush=True,
            )
    if saved is not None:  # the saved reference rows and meta stay; these methods' rows are replaced
        rows = [r for r in saved["rows"] if r["method"] not in methods] + [r for r in rows if r["method"] in methods]
        kept = {k: v for k, v in saved["training"].items() if k.split(" ")[0] not in methods}
        details = {**kept, **details}
        appended = {"methods": methods, "date": time.strftime("%Y-%m-%d", time.gmtime())}
        meta = {**saved["meta"], "appended": [*saved["meta"].get("appended", []), appended]}
    md = markdown(rows, meta)
    print(md)
    if not args.no_write:
        print(write_results("distill_mixture", {"meta": meta, "rows": rows, "training": details}, md))


if __name__ == "__main__":
    main()

"""FID / KID of a trained run for several samplers at fixed NFE, a many-step reference, and the
run's bits/dim (probability-flow ODE, and the ELBO bound). Writes
experiments/results/<name>.{json,md}.

    python -m experiments.sample_quality --config=configs/mnist.py --workdir=work/mnist \
        --solvers=ddim,dpm_solver++,unipc,edm_heun --nfe=10,20,50 --reference=ddim:1000

NFE counts every network evaluation, the final denoising included; each solver gets the largest
number of steps whose NFE does not exceed the target (the table shows the NFE actually used). A solver
is `name[:option=value[;option=value]][@grid]`, e.g. `unipc:order=3@karras` (default grid: the
config's sample.grid, else the solver's own).
FID and KID compare `--num_samples` samples with the first `--reference_images` images of the
evaluation split (default: as many as samples; FID is biased upwards at small sample counts: compare
rows of one table, not with published numbers). With several `--sample_seeds`, each row shows the
FID of every seed, their mean and its standard error. The results are rewritten after every row, so
a stopped run keeps the finished rows.

With `--reference`, the many-step reference row is sampled first, and every row also reports its
error against it from the same noise (each solver draws the prior from the same key): RMS(x - x_ref) /
RMS(x_ref - mean x_ref), the sampler suite's error (experiments/benchmarks/sampler_suite.py), here on a
trained network.
"""

from __future__ import annotations

import ast
import copy
import os
import time

import jax
import numpy as np
from absl import app, flags

import configs
from diffjax import data as data_lib
from diffjax import evaluation
from diffjax.samplers import GRIDS, SOLVERS
from diffjax.training import eval_metrics
from diffjax.training.config import apply_overrides, load_config_file, split_config_arguments
from diffjax.training.cpu_malloc import tune_cpu_malloc
from diffjax.training.from_config import sampler_from_config
from diffjax.training.images import to_uint8
from diffjax.training.loop import evaluation_split, load_for_config
from diffjax.validation import build_named
from experiments.benchmarks.common import markdown_table, mean_stderr, relative_error, write_results

flags.DEFINE_string(
    "config",
    os.path.join(os.path.dirname(configs.__file__), "mnist.py"),
    "The run's config file; --config.<key>=<value> overrides apply as on the diffjax command line.",
)
flags.DEFINE_string("workdir", None, "The trained run's directory.", required=True)
flags.DEFINE_list(
    "solvers",
    ["ddim", "dpm_solver++", "unipc", "edm_heun"],
    "Solvers to compare: name[:option=value[;option=value]][@grid], e.g. unipc:order=3@karras.",
)
flags.DEFINE_list("nfe", ["10", "20", "50"], "Network evaluations per sample.")
flags.DEFINE_string("reference", "ddim:1000", "solver:steps of the many-step reference row ('' = none).")
flags.DEFINE_list(
    "sample_seeds",
    [],
    "Seeds of the sampling keys, jax.random.key(seed) (default: the run's "
    "'fid' stream; the committed tables used 3); with several, each row reports the FID of every "
    "seed and their mean.",
)
flags.DEFINE_integer(
    "bpd_seed",
    None,
    "Seed of the bits/dim key, jax.random.key(seed) (default: the run's "
    "'bits_per_dim' stream; the committed tables used 4).",
)
flags.DEFINE_integer("num_samples", 1000, "Samples per row.")
flags.DEFINE_integer(
    "reference_images", None, "Images of the evaluation split in the FID/KID reference (default: --num_samples)."
)
flags.DEFINE_integer("bpd_examples", 256, "Evaluation-split images for bits/dim (0 = skip).")
flags.DEFINE_string("name", "mnist_sample_quality", "Results file name.")
flags.DEFINE_enum(
    "cpu_malloc", "auto", ["auto", "off"], "As the command line's: tune glibc's malloc (diffjax.training.cpu_malloc)."
)
flags.DEFINE_string("remark", "", "A paragraph for the table's header: how the run was trained, the machine.")
FLAGS = flags.FLAGS
_overrides: list[tuple[str, str]] = []  # the --config.<key>=<value> arguments, for apply_overrides


def _parse_flags(argv: list[str]) -> list[str]:
    rest, overrides = split_config_arguments(argv)
    _overrides[:] = overrides
    return FLAGS(rest)


def parse_solver(spec: str) -> tuple[str, dict, str]:
    """ "unipc:order=3;variant=bh1@karras" -> ("unipc", {"order": 3, "variant": "bh1"}, "karras");
    the grid is "" when the spec names none."""
    spec, _, grid = spec.partition("@")
    if grid and grid not in GRIDS:
        raise ValueError(f"grid {grid!r} in solver {spec + '@' + grid!r}: use one of {sorted(GRIDS)}")
    name, _, options = spec.partition(":")
    parsed = {}
    for item in filter(None, options.split(";")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"solver option {item!r} in {spec!r} is not of the form option=value")
        try:
            parsed[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed[key] = value  # a bare string, e.g. variant=bh1
    return name, parsed, grid


def steps_for_nfe(solver: str, nfe: int) -> tuple[int, int]:
    """The most steps whose NFE (with the final denoising) is <= nfe, and that NFE."""
    name, options, _ = parse_solver(solver)
    instance = build_named(SOLVERS, name, options, "solver")
    steps = instance.steps_for_nfe(nfe)
    return steps, instance.nfe(steps) + 1


def sampling_plan(solvers: list[str], nfes: list[str], reference: str) -> list[tuple[str, int, int]]:
    """(solver spec, steps, NFE) per row: the reference row first ("spec:steps"; "" for none), then each
    NFE for each solver. app.UsageError naming the value when a spec, NFE or step count is not valid."""
    try:
        plan = [(s, *steps_for_nfe(s, int(n))) for n in nfes for s in solvers]
    except (ValueError, TypeError) as error:
        raise app.UsageError(f"--solvers={','.join(solvers)} --nfe={','.join(nfes)}: {error}") from error
    if reference:
        solver, _, steps = reference.rpartition(":")
        if not solver or not steps.isdigit() or int(steps) < 1:
            raise app.UsageError(f"--reference={reference!r}: use solver[:options][@grid]:steps, e.g. ddim:1000")
        try:
            name, options, _ = parse_solver(solver)
            build_named(SOLVERS, name, options, "solver")
        except (ValueError, TypeError) as error:
            raise app.UsageError(f"--reference={reference!r}: {error}") from error
        plan.insert(0, (solver, int(steps), int(steps) + 1))
    return plan


def quality_table(rows, seeds, num):
    """One line per (solver, steps): FID and KID, or with several seeds the FID of each and the means."""
    with_error = any("error" in r for r in rows)
    if len(seeds) == 1:
        headers = ["solver", "steps", "NFE", "FID", "KID x1e3", "sampling s"] + (["error vs reference"] * with_error)
        # with fewer than 1000 samples KID's subsets are the whole sets: no spread to report
        return headers, [
            [
                r["solver"],
                r["steps"],
                r["nfe"],
                f"{r['fid']:.2f}",
                f"{r['kid_x1e3']:.2f}" + (f" ± {r['kid_std_x1e3']:.2f}" if num > 1000 else ""),
                r["sampling_seconds"],
            ]
            + ([f"{r['error']:.4f}"] if with_error else [])
            for r in rows
        ]
    headers = ["solver", "steps", "NFE"] + [f"FID seed {s}" for s in seeds] + ["FID mean ± s.e.", "KID x1e3 mean"]
    headers += ["error vs reference (mean)"] * with_error
    table = []
    for i in range(0, len(rows), len(seeds)):
        group = rows[i : i + len(seeds)]  # shorter than seeds when the run stopped inside this row
        fid_mean, fid_stderr = mean_stderr([r["fid"] for r in group])
        mean = f"{fid_mean:.2f}" + (f" ± {fid_stderr:.2f}" if len(group) > 1 else "")
        if len(group) < len(seeds):
            mean += f" ({len(group)} of {len(seeds)} seeds)"
        table.append(
            [group[0]["solver"], group[0]["steps"], group[0]["nfe"]]
            + [f"{r['fid']:.2f}" for r in group]
            + ["-" for _ in range(len(seeds) - len(group))]
            + [mean, f"{np.mean([r['kid_x1e3'] for r in group]):.2f}"]
            + ([f"{np.mean([r['error'] for r in group]):.4f}"] if with_error else [])
        )
    return headers, table


def write_table(
    base, run, step: int, split: str, rows: list, seeds: list, reference_count: int, likelihoods: dict, planned: int
):
    """experiments/results/<--name>.{json,md} of the rows so far (and the bits/dim when measured);
    `planned` rows in all (the table says when it has fewer)."""
    num = FLAGS.num_samples
    headers, table = quality_table(rows, seeds, num)
    progress = f"**In progress: {len(rows)} of {planned} rows.**\n\n" if len(rows) < planned else ""
    text = (
        f"# Sample quality: {base.data.name}, {base.model.name} ({run.spec.num_params / 1e6:.2f}M parameters), "
        f"{base.process.name} process, {base.loss.prediction} prediction, step {step}, EMA parameters\n\n"
        + progress
        + f"FID/KID: {num} samples vs the first {reference_count} images of the {split!r} split "
        "(small-sample FID is biased upwards; compare rows, not published numbers).\n\n"
        + (FLAGS.remark + "\n\n" if FLAGS.remark else "")
        + markdown_table(headers, table)
    )
    if likelihoods:
        text += "\n\nBits/dim on the first {} images of the {!r} split (uniform dequantization):\n\n".format(
            FLAGS.bpd_examples, split
        )
        text += markdown_table(
            ["estimator", "bits/dim", "std. error", "failed"],
            [[k, f"{v['bits_per_dim']:.3f}", f"{v['stderr']:.3f}", v["failed"]] for k, v in likelihoods.items()],
        )
    payload = {
        "workdir": os.path.abspath(FLAGS.workdir),
        "step": step,
        "config": base.to_dict(),
        "num_samples": num,
        "reference_images": reference_count,
        "rows": rows,
        "bits_per_dim": likelihoods,
    }
    return text, write_results(FLAGS.name, payload, text)


def main(argv) -> None:
    del argv
    if FLAGS.cpu_malloc == "auto":
        print(tune_cpu_malloc())  # before JAX starts: faster Inception features on the CPU
    base = apply_overrides(load_config_file(FLAGS.config), _overrides)
    info = data_lib.dataset_info(base.data)
    split = evaluation_split(info)
    reference_count = FLAGS.num_samples if FLAGS.reference_images is None else FLAGS.reference_images
    if not 1 <= reference_count <= info.num_examples[split]:
        raise app.UsageError(
            f"--reference_images={reference_count}: the {split!r} split has {info.num_examples[split]} images "
            "(use 1 to that many)"
        )
    plan = sampling_plan(FLAGS.solvers, FLAGS.nfe, FLAGS.reference)  # bad specs fail here, before any work
    loaded, run = load_for_config(base, FLAGS.workdir)  # the model from the checkpoint, checked against base
    params, num = loaded.ema_params, FLAGS.num_samples
    batch = int(base.eval.batch_size)
    inception = evaluation.load_inception_params(base.eval.inception_weights or None)
    statistics = eval_metrics.reference_for_split(base.data, split, reference_count, inception, batch_size=batch)
    keys = [(int(v), jax.random.key(int(v))) for v in FLAGS.sample_seeds] or [("fid", run.key("fid"))]
    seeds = [seed for seed, _ in keys]
    rows, reference_samples = [], {}
    for solver, steps, nfe in plan:
        config = copy.deepcopy(base)
        config.unlock()
        config.sample.solver, options, grid = parse_solver(solver)
        config.sample.steps = steps
        config.sample.solver_options.update(options)
        if grid:
            config.sample.grid, config.sample.grid_options = grid, {}
        row_run = run.with_sampler(sampler_from_config(config))  # a new Run: nothing is mutated
        for seed, key in keys:
            start = time.perf_counter()
            samples = eval_metrics.draw_samples(row_run, params, num, key, batch_size=batch)
            seconds = time.perf_counter() - start
            quality = eval_metrics.sample_quality(to_uint8(samples), statistics, inception, batch_size=batch)
            if FLAGS.reference:
                reference_samples.setdefault(seed, samples)  # the first row of each seed is the reference
                quality["error"] = relative_error(samples, reference_samples[seed])
            rows.append(
                {
                    "solver": solver,
                    "steps": steps,
                    "nfe": nfe,
                    "seed": seed,
                    "sampling_seconds": round(seconds, 1),
                    **quality,
                }
            )
            print(rows[-1], flush=True)
            write_table(base, run, loaded.step, split, rows, seeds, reference_count, {}, len(plan) * len(keys))

    likelihoods = {}
    if FLAGS.bpd_examples:
        images, labels = eval_metrics.split_images(base.data, split, FLAGS.bpd_examples, batch_size=batch)
        bpd_key = run.key("bits_per_dim") if FLAGS.bpd_seed is None else jax.random.key(FLAGS.bpd_seed)
        for estimator in ("ode", "elbo"):
            likelihoods[estimator] = eval_metrics.dataset_bits_per_dim(
                run, params, images, labels, bpd_key, batch_size=batch, estimator=estimator
            )
            print(estimator, likelihoods[estimator], flush=True)
    text, path = write_table(base, run, loaded.step, split, rows, seeds, reference_count, likelihoods, len(rows))
    print(text)
    print("wrote", path)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)

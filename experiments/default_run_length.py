"""How many training steps the default run needs: train configs/default.py (what `make run` runs) at
several --config.train.num_steps and training seeds, time each run as `make run` runs it, and compare
the FID / KID of its samples (the config's sampler: the library default at sample.steps) against the
data set.

    python -m experiments.default_run_length --steps 2000,1000 --train-seeds 0,1
    python -m experiments.default_run_length --steps 1000 --set optim.learning_rate=2e-3 --name NAME

Each run is a subprocess of the command line (`experiments/main.py`, tcmalloc preloaded where the
system has it, as the Makefile does), so its wall time includes start-up and compilation as a user
sees them. FID / KID: --num-samples samples from the EMA parameters (one sampling key, the same for
every run) against the first --reference-images images of the evaluation split. Writes
experiments/results/<--name>.{json,md} (rewritten after every run) and each run's last sample grid as
experiments/results/<--name>_<steps>steps_seed<seed>.png.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time

import jax

from diffjax import data as data_lib
from diffjax import evaluation
from diffjax.training import eval_metrics
from diffjax.training.config import ConfigError, apply_overrides, load_config_file, validate_config
from diffjax.training.cpu_malloc import tune_cpu_malloc
from diffjax.training.loop import evaluation_split, load_for_config
from experiments.benchmarks.common import REPO, RESULTS_DIR, markdown_table, mean_stderr, tcmalloc_path, write_results

CONFIG = os.path.join(REPO, "configs", "default.py")


def run_overrides(steps: int, seed: int, changes: list[str]) -> list[tuple[str, str]]:
    """The config changes of one run: its length and seed, then `changes` ("key=value", as --set)."""
    overrides = [("train.num_steps", str(steps)), ("seed", str(seed))]
    for item in changes:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: use key=value, e.g. optim.learning_rate=2e-3")
        overrides.append((key, value))
    return overrides


def run_plan(steps: str, seeds: str, changes: list[str]) -> list[tuple[int, int]]:
    """(steps, seed) per run from "2000,1000" and "0,1"; ValueError naming a bad --steps, --train-seeds or
    --set (checked against the config) before any work."""
    try:
        plan = [(int(n), int(seed)) for n in steps.split(",") for seed in seeds.split(",")]
    except ValueError as err:
        raise ValueError(f"--steps {steps} --train-seeds {seeds}: use comma-separated integers") from err
    if any(n < 1 for n, _ in plan):
        raise ValueError(f"--steps {steps}: use positive step counts")
    try:
        validate_config(apply_overrides(load_config_file(CONFIG), run_overrides(*plan[0], changes)))
    except ConfigError as err:
        raise ValueError(f"--set {' '.join(changes)}: {err}") from err
    return plan


def train_command(workdir: str, overrides: list[tuple[str, str]]) -> list[str]:
    command = [
        sys.executable,
        os.path.join(REPO, "experiments", "main.py"),
        f"--config={CONFIG}",
        f"--workdir={workdir}",
    ]
    return command + [f"--config.{key}={value}" for key, value in overrides]


def timed_training(workdir: str, overrides: list[tuple[str, str]]) -> float:
    """Wall seconds of one run of the command line, started fresh (workdir removed first)."""
    shutil.rmtree(workdir, ignore_errors=True)
    env = dict(os.environ)
    preload = tcmalloc_path()
    if preload:
        env["LD_PRELOAD"] = preload
    start = time.perf_counter()
    subprocess.run(train_command(workdir, overrides), check=True, env=env, cwd=REPO)
    return time.perf_counter() - start


def run_quality(workdir: str, overrides, inception, statistics, num: int, batch: int) -> dict:
    """FID / KID of `num` samples of the run's EMA parameters with the config's sampler (key 0)."""
    config = apply_overrides(load_config_file(CONFIG), overrides)  # as trained
    loaded, run = load_for_config(config, workdir)
    samples = eval_metrics.sample_images(run, loaded.ema_params, num, jax.random.key(0), batch_size=batch)
    return eval_metrics.sample_quality(samples, statistics, inception, batch_size=batch)


def report(rows: list[dict], planned: int, args, split: str) -> str:
    body = [
        [r["steps"], r["seed"], f"{r['wall_seconds']:.0f}", f"{r['fid']:.2f}", f"{r['kid_x1e3']:.2f}"] for r in rows
    ]
    summary = []
    for steps in dict.fromkeys(r["steps"] for r in rows):
        group = [r for r in rows if r["steps"] == steps]
        fid, fid_se = mean_stderr([r["fid"] for r in group])
        fid_text = f"{fid:.2f} ± {fid_se:.2f}" if len(group) > 1 else f"{fid:.2f}"
        summary.append([steps, len(group), f"{min(r['wall_seconds'] for r in group) / 60:.1f}", fid_text])
    progress = f"**In progress: {len(rows)} of {planned} runs.**\n\n" if len(rows) < planned else ""
    changes = f" and {', '.join(args.set)}" if args.set else ""
    return (
        "# The default run's length: training steps against sample quality\n\n"
        + progress
        + f"configs/default.py trained by the command line with --config.train.num_steps and --config.seed{changes}; "
        f"FID / KID of {args.num_samples} samples (EMA parameters, the config's sampler, one sampling key) against "
        f"the first {args.reference_images} images of the {split!r} split. Wall time: the whole command, start-up "
        "and compilation included; the runs go in the table's order, and the first of each length compiles its "
        "programs (the schedule's length is part of them), the others find them in the compilation cache.\n\n"
        + (args.remark + "\n\n" if args.remark else "")
        + markdown_table(["steps", "training seed", "wall s", "FID", "KID x1e3"], body)
        + "\n\n"
        + markdown_table(["steps", "runs", "wall min (fastest run)", "FID mean ± s.e."], summary)
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="2000,1000", help="values of config.train.num_steps, comma-separated")
    parser.add_argument("--train-seeds", default="0,1", help="values of config.seed: one run per steps and seed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config changes")
    parser.add_argument("--root", default="work/default_run_length", help="runs go to <root>/<name>/...")
    parser.add_argument("--num-samples", type=int, default=1000, help="samples per run for FID / KID")
    parser.add_argument("--reference-images", type=int, default=1797, help="evaluation-split images compared")
    parser.add_argument("--batch-size", type=int, default=125, help="batch of sampling and Inception features")
    parser.add_argument("--name", default="default_run_length", help="results file name")
    parser.add_argument("--remark", default="", help="a paragraph for the table's header: the machine, ...")
    args = parser.parse_args(argv)
    try:
        plan = run_plan(args.steps, args.train_seeds, args.set)
    except ValueError as err:
        parser.error(str(err))
    print(tune_cpu_malloc())  # this process: faster Inception features on the CPU
    config = load_config_file(CONFIG)
    split = evaluation_split(data_lib.dataset_info(config.data))
    inception = evaluation.load_inception_params(None)
    statistics = eval_metrics.reference_for_split(
        config.data, split, args.reference_images, inception, batch_size=args.batch_size
    )
    rows = []
    for steps, seed in plan:
        workdir = os.path.join(args.root, args.name, f"{steps}steps_seed{seed}")
        overrides = run_overrides(steps, seed, args.set)
        wall = timed_training(workdir, overrides)
        quality = run_quality(workdir, overrides, inception, statistics, args.num_samples, args.batch_size)
        rows.append({"steps": steps, "seed": seed, "wall_seconds": round(wall, 1), **quality})
        grid = sorted(glob.glob(os.path.join(workdir, "samples", "step_*.png")))[-1]
        shutil.copyfile(grid, os.path.join(RESULTS_DIR, f"{args.name}_{steps}steps_seed{seed}.png"))
        text = report(rows, len(plan), args, split)
        payload = {"num_samples": args.num_samples, "reference_images": args.reference_images, "split": split,
                   "set": args.set, "rows": rows}  # fmt: skip
        write_results(args.name, payload, text)
        print(text)


if __name__ == "__main__":
    main()

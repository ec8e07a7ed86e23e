"""Latent diffusion on a CPU, end to end: a tiny autoencoder trained on MNIST (16x16), its latent cache,
a DiT trained on the latents by configs/dit_latents.py:mnist_tiny, decoded samples and FID.

    python -m experiments.latent_dit_mnist [--ae-steps 800] [--steps 4000] [--workdir workdir]

It runs what these commands do (Python API: `diffjax.training.autoencoder.autoencoder_command`, `train`,
`sample_from_checkpoint`, `evaluate`):

    python -m diffjax.training.autoencoder --data=mnist --out=workdir/mnist_tiny_autoencoder --steps=800
    diffjax --config=configs/dit_latents.py:mnist_tiny --workdir=workdir/dit_latents_mnist_tiny
    diffjax --config=configs/dit_latents.py:mnist_tiny --workdir=workdir/dit_latents_mnist_tiny --mode=sample
    diffjax --config=configs/dit_latents.py:mnist_tiny --workdir=workdir/dit_latents_mnist_tiny --mode=eval

then copies the decoded sample grid to experiments/results/latent_dit_mnist_samples.png, plots the
training loss of metrics.jsonl (latent_dit_mnist_loss.{csv,png}) and writes
experiments/results/latent_dit_mnist.{json,md}. An existing autoencoder / latent cache is reused, and
training resumes from the newest checkpoint in its work directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time

from PIL import Image, ImageDraw

from diffjax.io import atomic_write_text
from diffjax.training import autoencoder as autoencoder_lib
from diffjax.training import evaluate, sample_from_checkpoint, train
from diffjax.training.config import apply_overrides, load_config_file
from experiments.benchmarks.common import RESULTS_DIR, environment, markdown_table, write_results

NAME = "latent_dit_mnist"
CONFIG = "configs/dit_latents.py:mnist_tiny"


def autoencoder_stage(directory: str, steps: int) -> dict:
    """Train the autoencoder and build the latent cache (skipped when both exist); its summary."""
    summary_path = os.path.join(directory, autoencoder_lib.SUMMARY_FILE)
    if not os.path.exists(summary_path):
        autoencoder_lib.autoencoder_command(["--data=mnist", f"--out={directory}", f"--steps={steps}"])
    with open(summary_path) as f:
        return json.load(f)


def loss_curve(workdir: str) -> list[tuple[int, float]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(int(r["step"]), float(r["loss"])) for r in rows if "loss" in r]


def _panel(draw, box, title, points):
    """A log-y line plot of (x, y) points inside box = (left, top, right, bottom)."""
    left, top, right, bottom = box
    draw.rectangle(box, outline="black")
    draw.text((left, top - 16), title, fill="black")
    points = [(x, y) for x, y in points if y > 0 and math.isfinite(y)]
    if len(points) < 2:
        return
    lo, hi = math.floor(math.log10(min(y for _, y in points))), math.ceil(math.log10(max(y for _, y in points)))
    hi = max(hi, lo + 1)
    xmax = max(x for x, _ in points)

    def at(x, y):
        fy = (math.log10(y) - lo) / (hi - lo)
        return left + (right - left) * x / xmax, bottom - (bottom - top) * fy

    for k in range(lo, hi + 1):
        _, y = at(0, 10.0**k)
        draw.line([left, y, right, y], fill=(225, 225, 225))
        draw.text((left - 34, y - 6), f"1e{k}", fill="black")
    draw.text((left, bottom + 4), "0", fill="black")
    draw.text((right - 40, bottom + 4), f"{xmax} steps", fill="black")
    draw.line([at(x, y) for x, y in points], fill=(31, 119, 180), width=1)


def plot_loss(curve: list[tuple[int, float]], autoencoder_curve: list[float], path: str) -> str:
    """Two log-y panels (autoencoder reconstruction MSE per step, DiT loss per logged step) as a PNG."""
    image = Image.new("RGB", (900, 320), "white")
    draw = ImageDraw.Draw(image)
    _panel(draw, (50, 30, 430, 290), "autoencoder: reconstruction MSE", list(enumerate(autoencoder_curve, 1)))
    _panel(draw, (500, 30, 880, 290), "DiT on latents: eps loss (logged steps)", curve)
    tmp = path + ".tmp.png"
    image.save(tmp)
    os.replace(tmp, path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ae-steps", type=int, default=800)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--workdir", default="workdir")
    args = parser.parse_args()

    ae_dir = os.path.join(args.workdir, "mnist_tiny_autoencoder")
    ae = autoencoder_stage(ae_dir, args.ae_steps)
    run_dir = os.path.join(args.workdir, "dit_latents_mnist_tiny")
    overrides = [("data.path", ae["latent_cache"]), ("train.num_steps", str(args.steps))]
    path, _, variant = CONFIG.partition(":")
    config = apply_overrides(load_config_file(f"{path}:{variant}"), overrides)

    start = time.perf_counter()
    trained = train(config, run_dir)
    train_seconds = time.perf_counter() - start
    sampled = sample_from_checkpoint(config, run_dir)
    start = time.perf_counter()
    evaluated = evaluate(config, run_dir)
    eval_seconds = time.perf_counter() - start

    samples_png = shutil.copy(sampled["grid"], os.path.join(RESULTS_DIR, f"{NAME}_samples.png"))
    curve = loss_curve(run_dir)
    atomic_write_text(
        os.path.join(RESULTS_DIR, f"{NAME}_loss.csv"), "step,loss\n" + "".join(f"{s},{v:.6f}\n" for s, v in curve)
    )
    loss_png = plot_loss(curve, ae["loss_curve"], os.path.join(RESULTS_DIR, f"{NAME}_loss.png"))
    payload = {
        "environment": environment(),
        "commands": [
            f"python -m diffjax.training.autoencoder --data=mnist --out={ae_dir} --steps={ae['steps']}",
            f"diffjax --config={CONFIG} --workdir={run_dir} "
            + " ".join(f"--config.{k}={v}" for k, v in overrides)
            + " [--mode=sample | --mode=eval]",
        ],
        "autoencoder": {k: v for k, v in ae.items() if k != "loss_curve"},
        "dit": {
            "num_params": trained["num_params"],
            "steps": trained["step"],
            "train_seconds_this_process": train_seconds,
            "final_logged_loss": trained.get("loss"),
            "mean_loss_last_500_steps": _mean_after(curve, trained["step"] - 500),
        },
        "sample": {k: sampled[k] for k in ("step", "num_samples", "seconds")},
        "eval": {**evaluated, "seconds": eval_seconds},
        "files": [os.path.basename(samples_png), os.path.basename(loss_png), f"{NAME}_loss.csv"],
    }
    write_results(NAME, payload, _markdown(payload))
    print(json.dumps({k: payload[k] for k in ("autoencoder", "dit", "eval")}, indent=2, default=str))


def _mean_after(curve, step: int) -> float:
    values = [v for s, v in curve if s > step]
    return sum(values) / max(1, len(values))


def _markdown(p: dict) -> str:
    ae, dit, ev = p["autoencoder"], p["dit"], p["eval"]
    rows = [
        ["autoencoder", f"{ae['steps']} steps, {ae['train_seconds']:.0f} s", f"test MSE {ae['test_mse']:.4f}"],
        [
            "DiT (configs/dit_latents.py:mnist_tiny)",
            f"{dit['steps']} steps, {dit['train_seconds_this_process']:.0f} s, {dit['num_params'] / 1e6:.2f}M params",
            f"final loss {dit['final_logged_loss']:.4f}, mean of last 500 steps {dit['mean_loss_last_500_steps']:.4f}",
        ],
        [
            "eval (decoded samples)",
            f"{ev.get('num_samples', 0)} samples vs {ev.get('num_reference', 0)} {ev['split']} images",
            f"FID {ev.get('fid', float('nan')):.2f}, KID x1e3 {ev.get('kid_x1e3', float('nan')):.2f}, "
            f"test loss {ev['test_loss']:.4f}",
        ],
    ]
    env = p["environment"]
    return (
        f"# {NAME}: latent diffusion on a CPU (MNIST 16x16 -> 8x8x2 latents)\n\n"
        + "\n".join(f"    {c}" for c in p["commands"])
        + "\n\n"
        + markdown_table(["stage", "run", "result"], rows)
        + f"\n\nSamples (decoded, EMA parameters): {p['files'][0]}; loss curves: {p['files'][1]} ({p['files'][2]}).\n"
        + f"Device: {env.get('device', env)}; shared 2-core CPU, wall times are noisy.\n"
    )


if __name__ == "__main__":
    main()

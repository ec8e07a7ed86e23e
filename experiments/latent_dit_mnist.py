"""Latent diffusion on a CPU, end to end: a tiny autoencoder trained on MNIST (16x16), its latent cache,
a DiT trained on the latents by configs/dit_latents.py:mnist_tiny, decoded samples and FID.

    python -m experiments.latent_dit_mnist [--ae-steps 1500] [--steps 4000] [--workdir workdir]

It runs what these commands do (Python API: `diffjax.training.autoencoder.main`, `train`,
`sample_from_checkpoint`, `evaluate`):

    python -m diffjax.training.autoencoder --data=mnist --out=workdir/mnist_tiny_autoencoder --steps=1500
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
import os
import shutil
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from diffjax.io import atomic_write_text  # noqa: E402
from diffjax.training import evaluate, sample_from_checkpoint, train  # noqa: E402
from diffjax.training import autoencoder as autoencoder_lib  # noqa: E402
from diffjax.training.config import apply_overrides, load_config_file  # noqa: E402
from experiments.benchmarks.common import RESULTS_DIR, environment, markdown_table, write_results  # noqa: E402

NAME = "latent_dit_mnist"
CONFIG = "configs/dit_latents.py:mnist_tiny"


def autoencoder_stage(directory: str, steps: int) -> dict:
    """Train the autoencoder and build the latent cache (skipped when both exist); its summary."""
    summary_path = os.path.join(directory, autoencoder_lib.SUMMARY_FILE)
    if not os.path.exists(summary_path):
        autoencoder_lib.main(["--data=mnist", f"--out={directory}", f"--steps={steps}"])
    with open(summary_path) as f:
        return json.load(f)


def loss_curve(workdir: str) -> list[tuple[int, float]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(int(r["step"]), float(r["loss"])) for r in rows if "loss" in r]


def plot_loss(curve: list[tuple[int, float]], autoencoder_curve: list[float], path: str) -> str:
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax0.plot(range(1, len(autoencoder_curve) + 1), autoencoder_curve, lw=0.8)
    ax0.set(title="autoencoder: reconstruction MSE", xlabel="step", yscale="log")
    ax1.plot([s for s, _ in curve], [v for _, v in curve], lw=0.8)
    ax1.set(title="DiT on latents: eps loss (logged steps)", xlabel="step", yscale="log")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ae-steps", type=int, default=1500)
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
            f"python -m diffjax.training.autoencoder --data=mnist --out={ae_dir} --steps={args.ae_steps}",
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

"""Short runs of configs/text_masked.py and configs/mnist_masked.py through the shared trainer, exactly
what `diffjax --config=configs/<name>.py --workdir=<dir>` then `--mode=eval` do (Python API: `train`,
`evaluate`), with the same `--config.<key>=<value>` overrides. Writes the validation bits per
character / test bits per dim (-ELBO), the samples and experiments/results/discrete_configs.{json,md}.

    python -m experiments.discrete_configs [--steps 2000] [--workdir /tmp/discrete_configs]

The default overrides shrink the text model to the size of experiments/discrete_text.py's
(hidden 64, depth 2, windows of 32, batch 32), so its autoregressive baseline is comparable.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

from diffjax.training import evaluate, train
from diffjax.training.config import apply_overrides, load_config_file
from experiments.benchmarks.common import RESULTS_DIR, markdown_table, write_results

CONFIGS = {
    "text_masked": [
        ("discrete.model_options.hidden_size", "64"),
        ("discrete.model_options.depth", "2"),
        ("discrete.sequence_length", "32"),
        ("train.batch_size", "32"),
        ("eval.bits_per_dim_examples", "256"),
        ("sample.steps", "128"),
    ],
    "mnist_masked": [],
}


def run_config(name: str, steps: int, workdir: str) -> dict:
    overrides = CONFIGS[name] + [("train.num_steps", str(steps)), ("train.checkpoint_every", str(max(1, steps // 4)))]
    config = apply_overrides(load_config_file(os.path.join("configs", f"{name}.py")), overrides)
    start = time.perf_counter()
    trained = train(config, workdir)
    seconds = time.perf_counter() - start
    summary = evaluate(config, workdir)
    extension = os.path.splitext(summary["samples"])[1]
    samples = shutil.copy(summary["samples"], os.path.join(RESULTS_DIR, f"discrete_configs_{name}_samples{extension}"))
    return {
        "overrides": [f"--config.{k}={v}" for k, v in overrides],
        "num_params": trained["num_params"],
        "train_loss_last_log": trained["loss"],
        "train_seconds": seconds,
        "eval": summary,
        "samples": os.path.basename(samples),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--workdir", default="/tmp/discrete_configs")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    results = {}
    for name in args.configs:
        workdir = os.path.join(args.workdir, name)
        shutil.rmtree(workdir, ignore_errors=True)
        results[name] = run_config(name, args.steps, workdir)
        print(name, results[name])
    rows = [
        [
            f"configs/{name}.py",
            r["eval"]["step"],
            r["num_params"],
            r["eval"]["split"],
            f"{r['eval']['bits_per_dim']['bits_per_dim']:.3f} ± {r['eval']['bits_per_dim']['stderr']:.3f}",
            r["eval"]["bits_per_dim"]["examples"],
            f"{r['train_seconds']:.0f}",
            r["samples"],
        ]
        for name, r in results.items()
    ]
    table = markdown_table(
        [
            "config",
            "steps trained",
            "parameters",
            "split",
            "bits per char / dim (-ELBO)",
            "examples",
            "train s",
            "samples",
        ],
        rows,
    )
    overrides = "\n".join(f"- `{name}`: `{' '.join(r['overrides'])}`" for name, r in results.items())
    md = (
        f"# Discrete configs through the trainer: {args.steps} steps each\n\n"
        "`diffjax --config=configs/<name>.py` with the overrides below, then `--mode=eval`: the -ELBO of the "
        "EMA parameters (8 stratified times per example, an upper bound on the NLL) on the validation "
        "windows (text) or the first test images (MNIST, binarised 14x14), and samples (ancestral, cached, "
        "`sample.steps` steps). A SHORT run on a shared 2-core CPU, far from converged.\n\n"
        + table
        + "\n\nOverrides:\n\n"
        + overrides
        + f"\n\nMade by `python -m experiments.discrete_configs --steps {args.steps}`.\n"
    )
    print(md)
    write_results("discrete_configs", {"args": vars(args), "results": results}, md)


if __name__ == "__main__":
    main()

"""What splitting the CPU into devices gives experiments/distill_mnist.py: its cd training step
(batch --batch-size of MNIST training images) and its cd sampling at 4 NFE (--sample-batch images per
call), on one JAX device and on the CPU split into --devices, through the script's own `train_cd`
and `generate_images`. The teacher is a randomly initialised U-Net of configs/mnist.py's size
(unet-small, 28x28, attention at 7x7; unconditional): the cost does not depend on its weights.

    python -m experiments.benchmarks.distill_cpu_split [--devices 2] [--rounds 3]

Each measurement is a fresh process (tcmalloc preloaded where the system has it); the rounds
alternate one device and the split. Reports the median seconds per training step (after the first,
compiling one) and per 1,000 sampled images (after the first, compiling call), and the per-round
speed-up of the split (median, min-max).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

from experiments.benchmarks.common import markdown_table, run_cpu_worker, write_results


def worker(devices: int, args) -> None:
    """Print {"step_s", "sample_s_per_1k", "device_count"} for `devices` CPU devices."""
    import jax

    jax.config.update("jax_num_cpu_devices", devices)  # before JAX computes anything

    from diffjax import data as data_lib
    from diffjax import evaluation, models
    from diffjax import processes as P
    from diffjax.data import default_data_config
    from diffjax.training.sharding import replicated
    from experiments import distill_mnist as M

    apply, params = models.functional(models.create("unet-small", image_size=28, attn_resolutions=(7,)))
    teacher = M.Teacher(
        lambda p, x, t: apply(p, x, t),
        jax.device_put(params, replicated(evaluation.data_mesh())),
        P.EDM(),
        0.5,
        (28, 28, 1),
    )
    with tempfile.TemporaryDirectory() as out:
        options = M.parse_args(["--teacher", "unused", "--out", out, "--batch-size", str(args.batch_size)])
        options.iterations, options.checkpoint_every = args.steps + 1, args.steps + 1
        options.sample_batch = args.sample_batch

        def make_batches():
            config = default_data_config("mnist")
            return data_lib.make_iterator(config, split="train", global_batch_size=args.batch_size, seed=0)

        trained, _ = M.train_cd(teacher, options, make_batches)
    generate = M.cd_generator(teacher, trained["student"], 4)
    num = args.sample_batch * (args.sample_calls + 1)
    M.generate_images(generate, num, jax.random.key(0), args.sample_batch, "cd NFE 4", teacher.batch_sharding)
    reply = {
        "step_s": M.STEP_SECONDS["cd"],
        "sample_s_per_1k": 1000 * M.SAMPLE_SECONDS["cd NFE 4"],
        "device_count": jax.device_count(),
    }
    print(json.dumps(reply))


def measure(devices: int, args) -> dict:
    options = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("batch_size", "sample_batch", "steps")]
    arguments = ["--worker", str(devices), *options, f"--sample-calls={args.sample_calls}"]
    return run_cpu_worker("experiments.benchmarks.distill_cpu_split", arguments, devices)


def speedup_cell(one: list[float], split: list[float]) -> str:
    ratios = [o / s for o, s in zip(one, split)]
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2, help="the split's device count")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="training batch (distill_mnist's default)")
    parser.add_argument("--sample-batch", type=int, default=250, help="images per sampling call (its default)")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per measurement")
    parser.add_argument("--sample-calls", type=int, default=2, help="timed sampling calls per measurement")
    parser.add_argument("--name", default="distill_cpu_split")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args)
        return
    if args.devices < 2 or args.steps < 2 or min(args.rounds, args.sample_calls) < 1:
        raise SystemExit(f"--devices {args.devices} must be >= 2, --steps >= 2, --rounds and --sample-calls >= 1")
    if args.batch_size % args.devices or args.sample_batch % args.devices:
        sizes = f"--batch-size {args.batch_size} and --sample-batch {args.sample_batch}"
        raise SystemExit(f"{sizes} must divide over --devices {args.devices}")
    results = {1: [], args.devices: []}
    for r in range(args.rounds):
        for devices in results:
            results[devices].append(measure(devices, args))
        print(f"round {r}: " + ", ".join(f"x{d}: {v[-1]}" for d, v in results.items()), flush=True)
    one, split = results[1], results[args.devices]
    rows = []
    for key, label, unit in (("step_s", "cd training step", "s"), ("sample_s_per_1k", "cd sampling, 4 NFE", "s / 1k")):
        a, b = [m[key] for m in one], [m[key] for m in split]
        rows.append([label, unit, f"{statistics.median(a):.2f}", f"{statistics.median(b):.2f}", speedup_cell(a, b)])
    headers = ["task", "unit", "one device", f"{args.devices} devices", "split speed-up: median (min-max)"]
    title = (
        f"# distill_mnist on one CPU device and split into {args.devices} ({args.rounds} rounds)\n\n"
        f"Training batch {args.batch_size}, sampling {args.sample_batch} images per call; unet-small at 28x28."
    )
    markdown = title + "\n\n" + markdown_table(headers, rows)
    print(markdown)
    payload = {**vars(args), "one_device": one, "split": split}
    print("wrote", write_results(args.name, payload, markdown))


if __name__ == "__main__":
    main()

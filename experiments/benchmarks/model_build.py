"""Time to build a model abstractly (`nnx.eval_shape`, as `prepare_run` does) with and without
`models.fast_module_tracing`, in the same run.

    python -m experiments.benchmarks.model_build                         # the presets below
    python -m experiments.benchmarks.model_build --presets DiT-XL/2 --repeats 1

flax NNX probes `tracer.sharding` on every variable update while a module is built under a trace;
JAX 0.10 answers with an AttributeError whose message walks every equation traced so far, so the
plain build is quadratic in the model's size. Each row: the median of `--repeats` builds of each
kind, alternating, and their ratio. Writes experiments/results/model_build.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time

from flax import nnx

from diffjax import models
from experiments.benchmarks.common import markdown_table, write_results

PRESETS = ("unet-small", "DDPM++-cifar10", "NCSN++-cifar10", "ADM-imagenet64", "DiT-B/2")
MODEL_CLASSES = {
    models.SongUNetConfig: models.SongUNet,
    models.ADMUNetConfig: models.ADMUNet,
    models.DiTConfig: models.DiT,
    models.EDM2UNetConfig: models.EDM2UNet,
}


def build_seconds(preset: str, fast: bool) -> float:
    config = models.get_config(preset)
    constructor = MODEL_CLASSES[type(config)]  # the class itself: models.build switches fast tracing on
    start = time.perf_counter()
    if fast:
        with models.fast_module_tracing():
            nnx.eval_shape(lambda: constructor(config, rngs=nnx.Rngs(0)))
    else:
        nnx.eval_shape(lambda: constructor(config, rngs=nnx.Rngs(0)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for preset in args.presets.split(","):
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for fast in (False, True):
                times[fast].append(build_seconds(preset, fast))
        plain, fast = statistics.median(times[False]), statistics.median(times[True])
        params = models.param_count(models.functional(nnx.eval_shape(lambda: models.create(preset)))[1])
        rows.append({"preset": preset, "params": params, "plain_s": plain, "fast_s": fast, "speedup": plain / fast})
        print(rows[-1], flush=True)
    table = [
        [r["preset"], f"{r['params'] / 1e6:.1f}M", f"{r['plain_s']:.2f}", f"{r['fast_s']:.2f}", f"{r['speedup']:.1f}x"]
        for r in rows
    ]
    text = (
        "# Abstract model build (nnx.eval_shape) with and without fast_module_tracing\n\n"
        f"Median of {args.repeats} alternating builds per row, CPU.\n\n"
        + markdown_table(["preset", "parameters", "plain s", "fast s", "speed-up"], table)
        + "\n"
    )
    print(text)
    write_results("model_build", {"settings": vars(args), "rows": rows}, text)


if __name__ == "__main__":
    main()

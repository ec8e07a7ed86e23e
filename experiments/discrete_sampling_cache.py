"""Sampling throughput of masked diffusion with and without RADD caching (tokens/s, CPU).

A time-free `SequenceTransformer` (random weights: how many steps change the sequence, and so how
many network calls caching saves, depends on the masking schedule only, not on the weights) samples
sequences with the ancestral sampler on the linear schedule, with steps >= length (where most steps
reveal nothing). Each timing is the best of `--repeats` runs after a compiling warm-up; both modes are
measured in the same process. Writes experiments/results/discrete_sampling_cache.{json,md}.

    python -m experiments.discrete_sampling_cache
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
from flax import nnx

from diffjax.discrete.denoisers import CategoricalDenoiser
from diffjax.discrete.processes import MaskedProcess
from diffjax.discrete.samplers import DiscreteAncestral, sample_tokens
from diffjax.models import functional
from diffjax.models.sequence import SequenceConfig, SequenceTransformer
from experiments.benchmarks.common import markdown_table, write_results


def timed_pair(fns, repeats):
    """Best wall-clock and best process CPU seconds of each function, the calls interleaved
    (a, b, a, b, ...) after one compiling call each, so that load from other jobs hits both alike."""
    outs = {name: jax.block_until_ready(fn()) for name, fn in fns.items()}
    wall = {name: float("inf") for name in fns}
    cpu = dict(wall)
    for _ in range(repeats):
        for name, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            wall[name] = min(wall[name], time.perf_counter() - w)
            cpu[name] = min(cpu[name], time.process_time() - c)
    return wall, cpu, outs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    vocab = 96
    process = MaskedProcess.create(vocab)
    cfg = SequenceConfig(
        num_states=vocab + 1, vocab_size=vocab, length=args.length, hidden_size=128, depth=3, num_heads=4
    )
    apply, params = functional(SequenceTransformer(cfg, rngs=nnx.Rngs(0)))
    den = CategoricalDenoiser(lambda x, t: apply(params, x, t), process, time_free=True)
    rows, records = [], []
    for batch in (1, 8):
        for steps in (args.length, 4 * args.length):
            fns = {
                cache: functools.partial(
                    sample_tokens, den, jax.random.key(0), (batch, args.length), DiscreteAncestral(), steps, cache=cache
                )
                for cache in (False, True)
            }
            wall, cpu, outs = timed_pair(fns, args.repeats)
            nfe = {c: int(outs[c].nfe) for c in fns}
            tps = {c: batch * args.length / wall[c] for c in fns}
            rows.append(
                [
                    batch,
                    steps,
                    nfe[False],
                    nfe[True],
                    f"{tps[False]:.0f}",
                    f"{tps[True]:.0f}",
                    f"{wall[False] / wall[True]:.2f}",
                    f"{cpu[False] / cpu[True]:.2f}",
                ]
            )
            records.append(
                {
                    "batch": batch,
                    "steps": steps,
                    "nfe": {str(c): nfe[c] for c in fns},
                    "wall_seconds": {str(c): wall[c] for c in fns},
                    "cpu_seconds": {str(c): cpu[c] for c in fns},
                }
            )
            print(rows[-1], flush=True)
    md = (
        "# Masked diffusion sampling: RADD caching, tokens per second (CPU)\n\n"
        f"SequenceTransformer hidden 128, depth 3, 4 heads, length {args.length}, vocabulary 96 (+ mask); ancestral "
        "sampler, linear schedule, time-free denoiser. Caching skips the network on steps after which no "
        "sequence of the batch changed, so it saves more with more steps and fewer sequences per batch. "
        f"Best of {args.repeats} interleaved runs after compiling; shared 2-core CPU under heavy load from other "
        "jobs (load average about 30), so wall-clock numbers are noisy: the CPU-time ratio (process CPU seconds, "
        "all threads) is the steadier measure. Compare within a row only.\n\n"
        + markdown_table(
            [
                "batch",
                "steps",
                "NFE",
                "NFE cached",
                "tokens/s",
                "tokens/s cached",
                "wall speed-up",
                "CPU-time speed-up",
            ],
            rows,
        )
        + "\n\nMade by `python -m experiments.discrete_sampling_cache`.\n"
    )
    print(md)
    write_results("discrete_sampling_cache", {"length": args.length, "results": records}, md)


if __name__ == "__main__":
    main()

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
import time

import jax
from flax import nnx

from diffjax.discrete.denoisers import CategoricalDenoiser
from diffjax.discrete.processes import MaskedProcess
from diffjax.discrete.samplers import DiscreteAncestral, sample_tokens
from diffjax.models import functional
from diffjax.models.sequence import SequenceConfig, SequenceTransformer
from experiments.benchmarks.common import markdown_table, write_results


def timed(fn, repeats):
    jax.block_until_ready(fn())  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
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
            measured = {}
            for cache in (False, True):
                fn = lambda: sample_tokens(
                    den, jax.random.key(0), (batch, args.length), DiscreteAncestral(), steps, cache=cache
                )  # noqa: E731
                seconds, out = timed(fn, args.repeats)
                measured[cache] = (seconds, int(out.nfe))
            tps = {c: batch * args.length / s for c, (s, _) in measured.items()}
            rows.append(
                [
                    batch,
                    steps,
                    measured[False][1],
                    measured[True][1],
                    f"{tps[False]:.0f}",
                    f"{tps[True]:.0f}",
                    f"{tps[True] / tps[False]:.2f}",
                ]
            )
            records.append(
                {
                    "batch": batch,
                    "steps": steps,
                    "nfe": {str(c): measured[c][1] for c in measured},
                    "seconds": {str(c): measured[c][0] for c in measured},
                }
            )
            print(rows[-1])
    md = (
        "# Masked diffusion sampling: RADD caching, tokens per second (CPU)\n\n"
        f"SequenceTransformer hidden 128, depth 3, 4 heads, length {args.length}, vocabulary 96 (+ mask); ancestral "
        "sampler, linear schedule, time-free denoiser. Caching skips the network on steps after which no "
        "sequence of the batch changed, so it saves more with more steps and fewer sequences per batch. "
        f"Best of {args.repeats} runs after compiling; shared 2-core CPU under heavy load from other jobs, "
        "so compare the two columns of a row (same process, same minute), not rows across runs.\n\n"
        + markdown_table(["batch", "steps", "NFE", "NFE cached", "tokens/s", "tokens/s cached", "speed-up"], rows)
        + "\n\nMade by `python -m experiments.discrete_sampling_cache`.\n"
    )
    print(md)
    write_results("discrete_sampling_cache", {"length": args.length, "results": records}, md)


if __name__ == "__main__":
    main()

"""Masked diffusion on binarised MNIST pixels with the pixel variant of `SequenceTransformer`.

MNIST (the shared mnist.npz) is average-pooled to `--size` x `--size` and thresholded at 0.5: tokens in
{0, 1}, the mask is state 2. The model sees a (size, size) token image with 2-D sin-cos positions.
Reports validation bits per dimension (continuous-time -ELBO, 8 stratified times per image, on the
first `--eval_images` test images) and writes a sample grid PNG and
experiments/results/discrete_mnist.{json,md}.

    python -m experiments.discrete_mnist [--steps 300] [--size 14]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from diffjax.discrete.denoisers import CategoricalDenoiser
from diffjax.discrete.likelihood import masked_elbo_nats
from diffjax.discrete.losses import make_discrete_loss_fn
from diffjax.discrete.processes import MaskedProcess
from diffjax.discrete.samplers import DiscreteAncestral, sample_tokens
from diffjax.models import functional
from diffjax.models.sequence import SequenceConfig, SequenceTransformer
from diffjax.training.images import save_image_grid
from diffjax.training.state import create_train_state, ema, make_learning_rate, make_optimizer, make_train_step
from experiments.benchmarks.common import RESULTS_DIR, markdown_table, write_results


def binarised(images: np.ndarray, size: int) -> np.ndarray:
    """(n, 28, 28) uint8 -> (n, size, size) int32 in {0, 1}: mean-pool by 28 // size, threshold 0.5."""
    f = 28 // size
    x = images[:, : size * f, : size * f].astype(np.float32) / 255.0
    x = x.reshape(len(x), size, f, size, f).mean(axis=(2, 4))
    return (x > 0.5).astype(np.int32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--size", type=int, default=14)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--eval_images", type=int, default=256)
    parser.add_argument("--data", default=os.environ.get("DIFFJAX_MNIST", "/work/shared/data/mnist.npz"))
    args = parser.parse_args()
    data = np.load(args.data)
    train, test = binarised(data["x_train"], args.size), binarised(data["x_test"][: args.eval_images], args.size)
    process = MaskedProcess.create(2)
    cfg = SequenceConfig(
        num_states=3,
        vocab_size=2,
        length=(args.size, args.size),
        hidden_size=args.hidden,
        depth=args.depth,
        num_heads=4,
    )
    apply, params = functional(SequenceTransformer(cfg, rngs=nnx.Rngs(0)))
    loss_fn = make_discrete_loss_fn(apply, process, "masked_elbo", time_free=True)
    lr = make_learning_rate(1e-3, args.steps, warmup_steps=50, schedule="cosine", min_lr_ratio=0.1)
    optimizer = make_optimizer(lr, name="adam", grad_clip=1.0)
    state = create_train_state(params, optimizer, 0, average=ema(0.99))
    step = jax.jit(make_train_step(loss_fn, optimizer, ema(0.99)))
    rng, losses, start = np.random.default_rng(0), [], time.time()
    for _ in tqdm(range(args.steps), desc="binarised MNIST"):
        state, metrics = step(state, jnp.asarray(train[rng.integers(0, len(train), args.batch)]))
        losses.append(float(metrics["bits_per_token"]))
    seconds = time.time() - start
    params = state.ema_params
    den = CategoricalDenoiser(lambda x, t: apply(params, x, t), process, time_free=True)
    test = jnp.asarray(test)
    nats = jnp.concatenate(
        [masked_elbo_nats(den, jax.random.key(i), test[i : i + 64], 8) for i in range(0, len(test), 64)]
    )
    bpd = float(jnp.mean(nats) / (args.size**2 * math.log(2.0)))
    out = sample_tokens(
        den, jax.random.key(0), (16, args.size, args.size), DiscreteAncestral(), args.size**2, cache=True
    )
    grid = os.path.join(RESULTS_DIR, "discrete_mnist_samples.png")
    save_image_grid(np.asarray(out.tokens, np.float32)[..., None] * 2 - 1, grid, columns=8, upscale=4)
    result = {
        "valid_bits_per_dim": bpd,
        "train_bits_per_dim_last50": float(np.mean(losses[-50:])),
        "train_seconds": seconds,
        "sample_nfe": int(out.nfe),
        "sample_steps": args.size**2,
    }
    md = (
        f"# Masked diffusion on binarised MNIST ({args.size}x{args.size})\n\n"
        f"SequenceTransformer pixel variant, hidden {args.hidden}, depth {args.depth}; {args.steps} steps of "
        f"batch {args.batch}, Adam 1e-3 (cosine), EMA 0.99 evaluated; RADD time-free, linear schedule. Bits per "
        f"dim: continuous-time -ELBO on the first {args.eval_images} test images (8 stratified times each). A "
        "SHORT run on a shared 2-core CPU, far from converged.\n\n"
        + markdown_table(
            ["train bits/dim (last 50)", "test bits/dim (-ELBO)", "train s", "sampling NFE (cached) / steps"],
            [
                [
                    f"{result['train_bits_per_dim_last50']:.3f}",
                    f"{bpd:.3f}",
                    f"{seconds:.0f}",
                    f"{int(out.nfe)} / {args.size**2}",
                ]
            ],
        )
        + "\n\nSamples (ancestral, cached): `discrete_mnist_samples.png`.\n\nMade by `python -m "
        f"experiments.discrete_mnist --steps {args.steps} --size {args.size}`.\n"
    )
    print(md)
    write_results("discrete_mnist", {"args": vars(args), "results": result}, md)


if __name__ == "__main__":
    main()

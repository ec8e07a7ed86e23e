"""Latent cache formats: the npz (loaded whole) against the records directory (array_record shards read
by index), at DiT's ImageNet latent shape 32x32x4 float32 with flipped latents.

    python experiments/benchmarks/latent_records.py                 # 8192 examples, ~1 min
    python experiments/benchmarks/latent_records.py --examples 2048 # quicker

The "encoder" is the identity on 32x32x4 uint8 random images mapped to [-1, 1] (the cost measured is
the writing and reading, not an autoencoder). Rows: building each cache (examples per second, size on
disk), opening a split (seconds and the process's resident memory it adds), random batches of
--batch examples with random flips read straight from the source (median milliseconds per batch),
and the data pipeline's batches (`diffjax.data.make_iterator`, shuffled, random_flip=True; examples
per second over --seconds). The machine may be shared: compare rows of the same run only.

Prints a table and writes experiments/results/latent_records.json and .md.
"""

import argparse
import gc
import os
import shutil
import tempfile
import time

import numpy as np

import diffjax.data as dd
from diffjax.data.latents import build_latent_cache, build_latent_records, open_latent_source
from diffjax.data.sources import ArraySource
from experiments.benchmarks.common import markdown_table, package_versions, write_results

SHAPE = (32, 32, 4)


def resident_mb() -> float:
    with open("/proc/self/status") as stream:
        for line in stream:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def disk_mb(path: str) -> float:
    if os.path.isfile(path):
        return os.path.getsize(path) / 2**20
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**20


def identity(x):
    return x


def measure_format(label, path, examples, batch, seconds, build):
    start = time.perf_counter()
    build()
    build_s = time.perf_counter() - start
    gc.collect()
    before = resident_mb()
    start = time.perf_counter()
    source = open_latent_source(path, "train", 10)
    open_s = time.perf_counter() - start
    opened_mb = resident_mb() - before
    rng = np.random.default_rng(0)
    times = []
    for _ in range(30):
        indices = rng.integers(0, examples, batch)
        start = time.perf_counter()
        source.read_flipped(indices, rng.random(batch) < 0.5)
        times.append(time.perf_counter() - start)
    del source
    config = dd.base_data_config()
    config.update(source="latents", path=path, image_size=SHAPE[0], channels=SHAPE[2], num_classes=10)
    config.random_flip = True
    iterator = dd.make_iterator(config, split="train", global_batch_size=batch, seed=0)
    for _ in range(3):
        next(iterator)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(next(iterator)["image"])
    pipeline_rate = count / (time.perf_counter() - start)
    return {
        "format": label,
        "build_examples_per_s": examples / build_s,
        "disk_mb": disk_mb(path),
        "open_s": open_s,
        "open_resident_mb": opened_mb,
        "read_batch_ms_median": 1e3 * float(np.median(times)),
        "pipeline_examples_per_s": pipeline_rate,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3.0, help="pipeline measuring time per format")
    parser.add_argument("--examples-per-shard", type=int, default=1024)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.examples, *SHAPE), dtype=np.uint8)
    labels = rng.integers(0, 10, args.examples).astype(np.int32)
    splits = {"train": ArraySource(images, labels)}
    root = tempfile.mkdtemp(prefix="latent_records_")
    try:
        npz, records = os.path.join(root, "latents.npz"), os.path.join(root, "records")
        rows = [
            measure_format(
                "npz (in memory)",
                npz,
                args.examples,
                args.batch,
                args.seconds,
                lambda: build_latent_cache(splits, identity, npz, num_classes=10, batch_size=256, flips=True),
            ),
            measure_format(
                "records directory",
                records,
                args.examples,
                args.batch,
                args.seconds,
                lambda: build_latent_records(
                    splits,
                    identity,
                    records,
                    num_classes=10,
                    examples_per_shard=args.examples_per_shard,
                    batch_size=256,
                    flips=True,
                    process_index=0,
                    process_count=1,
                ),
            ),
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    headers = [
        "format",
        "build ex/s",
        "disk MB",
        "open s",
        "open RSS MB",
        f"read {args.batch} ms",
        "pipeline ex/s",
    ]
    table = markdown_table(
        headers,
        [
            [
                r["format"],
                f"{r['build_examples_per_s']:.0f}",
                f"{r['disk_mb']:.0f}",
                f"{r['open_s']:.3f}",
                f"{r['open_resident_mb']:.0f}",
                f"{r['read_batch_ms_median']:.1f}",
                f"{r['pipeline_examples_per_s']:.0f}",
            ]
            for r in rows
        ],
    )
    print(table)
    settings = {
        "examples": args.examples,
        "shape": list(SHAPE),
        "batch": args.batch,
        "examples_per_shard": args.examples_per_shard,
        "seconds": args.seconds,
        "load_average": os.getloadavg(),
    }
    payload = {"settings": settings, "versions": package_versions("numpy", "grain", "array-record"), "rows": rows}
    print(write_results("latent_records", payload, table + "\n"))


if __name__ == "__main__":
    main()

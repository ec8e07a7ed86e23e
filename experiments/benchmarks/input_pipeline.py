"""Input pipeline throughput: 32x32 RGB CIFAR-10 with augmentation, with and without JPEG decoding.

    python experiments/benchmarks/input_pipeline.py                  # all rows, ~8 s each
    python experiments/benchmarks/input_pipeline.py --seconds 3      # quicker
    python experiments/benchmarks/input_pipeline.py --data-dir /tmp/tfds

Data: ../shared/data/cifar10-jpeg.tar prepared once as array_record TFDS data (original JPEG bytes) in
--data-dir (default: the TFDS default). Augmentation in every row: random horizontal flip, uniform
dequantization and scaling to [-1, 1] (`diffjax.data.pipeline.augment`), per-example randomness.

- "JPEG decode": records read from array_record, parsed, JPEG-decoded with PIL (libjpeg) every time.
- "in memory": the split decoded once into RAM (data config in_memory=True); no decoding per batch.

Rows vary grain's in-process reader threads and worker processes (mp_prefetch). Throughput is images
per second of one host (process_count=1) consuming batches as fast as it can, after 3 warm-up batches
(worker start-up excluded); each row is measured in 3 windows and the best (and median) reported, since
the machine may be shared: the load average before and after is recorded too. Also a single-thread cost
breakdown per image.

Prints a table and writes JSON (device, versions, date, settings, rows) to
experiments/results/input_pipeline.json.
"""

import argparse
import datetime
import os
import platform
import time

import numpy as np

import diffjax.data as dd
from diffjax.data import builders, pipeline, sources
from diffjax.io import atomic_write_json
from experiments.benchmarks.common import package_versions

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results", "input_pipeline.json")
TARGET_IMAGES_PER_S = 5000
ROWS = (  # (label, in_memory, num_threads, worker_count)
    ("JPEG decode, 1 process, no reader threads", False, 0, 0),
    ("JPEG decode, 1 process, 2 reader threads", False, 2, 0),
    ("JPEG decode, 2 worker processes", False, 1, 2),
    ("in memory, 1 process, no reader threads", True, 0, 0),
    ("in memory, 2 worker processes", True, 1, 2),
)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict:
    names = ("numpy", "grain", "tensorflow-datasets", "array-record", "pillow", "jax")
    return {"python": platform.python_version(), **package_versions(*names)}


def _config(data_dir: str, **overrides):
    config = dd.default_data_config("cifar10")
    config.update(data_dir=data_dir, random_flip=True, dequantize=True, **overrides)
    return config


def measure_row(config, batch: int, seconds: float, windows: int = 3) -> dict:
    """Images/s of make_iterator after 3 warm-up batches: best and median of `windows` windows."""
    start = time.perf_counter()
    iterator = dd.make_iterator(config, split="train", global_batch_size=batch, seed=0)
    for _ in range(3):
        next(iterator)
    warmup_s = time.perf_counter() - start
    rates = []
    for _ in range(windows):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            next(iterator)
            count += 1
        rates.append(count * batch / (time.perf_counter() - start))
    iterator.close()
    return {
        "images_per_s": max(rates),
        "images_per_s_median": float(np.median(rates)),
        "window_rates": rates,
        "setup_and_warmup_s": warmup_s,
    }


def stage_costs(config, batch: int, repeats: int = 8) -> dict:
    """Single-thread microseconds per image of each stage, on random batches of the train split."""
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=import-outside-toplevel

    source = sources.open_source(config, "train")
    rng = np.random.default_rng(0)
    index_batches = [rng.integers(0, len(source), batch) for _ in range(repeats)]

    def per_image_us(fn, inputs) -> float:
        begin = time.perf_counter()
        for item in inputs:
            fn(item)
        return (time.perf_counter() - begin) / (len(inputs) * batch) * 1e6

    def read_and_parse(indices):
        records = source.records.__getitems__([int(i) for i in indices])
        return [tf_example_pb2.Example.FromString(r).features.feature["image"].bytes_list.value[0] for r in records]

    def decode_all(spec):
        return lambda encoded: [sources.decode_image(data, spec) for data in encoded]

    encoded = [read_and_parse(indices) for indices in index_batches]
    images = [source.read(indices)[0] for indices in index_batches]
    positions = np.arange(batch)
    return {
        "read_and_parse_records": per_image_us(read_and_parse, index_batches),
        "jpeg_decode_direct_libjpeg": per_image_us(decode_all(source.spec), encoded),
        "jpeg_decode_pil_image_open": per_image_us(decode_all(sources.ImageSpec(32, 3)), encoded),
        "augment_flip_dequantize_scale": per_image_us(
            lambda x: pipeline.augment(x, positions, seed=0, random_flip=True, dequantize=True), images
        ),
        "augment_scale_only": per_image_us(
            lambda x: pipeline.augment(x, positions, seed=0, random_flip=False, dequantize=False), images
        ),
        "source_read_total": per_image_us(source.read, index_batches),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="host batch size")
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per row")
    parser.add_argument("--data-dir", default="", help="TFDS data dir for the prepared tar (default: TFDS's)")
    parser.add_argument("--out", default=RESULTS_PATH)
    args = parser.parse_args()

    load_before = os.getloadavg()
    config = _config(args.data_dir)
    data_dir = args.data_dir or builders.default_data_dir()
    was_prepared = builders.is_prepared("image_tar", config.path, 3, data_dir)
    begin = time.perf_counter()
    dd.prepare(config)
    prepare_s = None if was_prepared else time.perf_counter() - begin

    costs = stage_costs(config, args.batch)
    rows = []
    for label, in_memory, threads, workers in ROWS:
        row_config = _config(args.data_dir, in_memory=in_memory, num_threads=threads, worker_count=workers)
        result = measure_row(row_config, args.batch, args.seconds)
        rows.append(
            {"row": label, "decoding": not in_memory, "num_threads": threads, "worker_count": workers, **result}
        )
        print(f"  measured: {label}: {result['images_per_s']:.0f} images/s", flush=True)
    load_after = os.getloadavg()

    print(
        f"\nInput pipeline, CIFAR-10 32x32 RGB, host batch {args.batch}, flip + dequantize + scale "
        f"({os.cpu_count()} CPUs: {_cpu_name()}; load average before/after "
        f"{load_before[0]:.1f}/{load_after[0]:.1f})"
    )
    print(f"{'configuration':48s} {'images/s':>10s} {'median':>10s} {'setup+warmup s':>15s}")
    for row in rows:
        print(
            f"{row['row']:48s} {row['images_per_s']:10.0f} {row['images_per_s_median']:10.0f} "
            f"{row['setup_and_warmup_s']:15.1f}"
        )
    print("\nSingle-thread cost per image (microseconds)")
    for stage, micros in costs.items():
        print(f"  {stage:34s} {micros:8.1f}")
    best_decoding = max(r["images_per_s"] for r in rows if r["decoding"])
    verdict = "met" if best_decoding >= TARGET_IMAGES_PER_S else "NOT met"
    print(
        f"\nBest with JPEG decoding: {best_decoding:.0f} images/s (target >= {TARGET_IMAGES_PER_S} per host: {verdict})"
    )
    if prepare_s is not None:
        print(f"One-off preparation of the tar as array_record: {prepare_s:.1f} s")

    result = {
        "what": "diffjax.data input pipeline throughput, CIFAR-10 JPEG tar, 32x32 RGB, flip+dequantize+scale",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu x{os.cpu_count()} ({_cpu_name()}), shared machine",
        "load_average_1min_before_after": [load_before[0], load_after[0]],
        "versions": _versions(),
        "settings": {
            "host_batch": args.batch,
            "seconds_per_row": args.seconds,
            "process_count": 1,
            "augmentation": ["random_flip", "dequantize", "scale_to_[-1,1]"],
        },
        "prepare_seconds": prepare_s,
        "rows": rows,
        "stage_microseconds_per_image_single_thread": costs,
        "target_images_per_s_with_decoding": TARGET_IMAGES_PER_S,
        "best_images_per_s_with_decoding": best_decoding,
        "target_met": best_decoding >= TARGET_IMAGES_PER_S,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()

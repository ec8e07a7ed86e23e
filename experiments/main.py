"""diffjax command line: train, sample or evaluate from an ml_collections config.

    diffjax --config=configs/default.py --workdir=work/default              # train (resumes)
    diffjax --config=configs/mnist.py --config.train.num_steps=2000 --workdir=work/mnist
    diffjax --config=configs/default.py --workdir=work/default --mode=sample
    diffjax --config=configs/default.py --workdir=work/default --mode=eval

Without --config the embedded default (configs/default.py: 8x8 digits from scikit-learn, upscaled
to 16x16, a small U-Net) is used. Any key can be overridden with --config.<path>=<value>.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

import configs

DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), "default.py")

config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Experiment config file (get_config()).", lock_config=True)
flags.DEFINE_string("workdir", "work/default", "Directory for checkpoints, metrics and samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"], "What to do.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (auto-detected on TPU pods, SLURM, Open MPI).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs elsewhere).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
FLAGS = flags.FLAGS


def _initialize_distributed() -> None:
    """Join the other processes of a multi-host run: every host runs this same program."""
    if not (FLAGS.distributed or FLAGS.coordinator_address):
        return
    import jax

    if FLAGS.coordinator_address and (FLAGS.num_processes is None or FLAGS.process_id is None):
        raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only hosts
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )


def _setup_logging() -> None:
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file operation at INFO
    logger = logging.getLogger("diffjax")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _setup_logging()
    _initialize_distributed()
    from diffjax.training import ConfigError, TrainingStopped, evaluate, sample_from_checkpoint, train
    from diffjax.training.checkpoint import CheckpointError

    config = FLAGS.config
    try:
        if FLAGS.mode == "train":
            summary = train(config, FLAGS.workdir)
        elif FLAGS.mode == "sample":
            summary = sample_from_checkpoint(config, FLAGS.workdir)
        else:
            summary = evaluate(config, FLAGS.workdir)
    except (ConfigError, CheckpointError, FileNotFoundError, TrainingStopped) as err:
        print(f"diffjax: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    print(f"diffjax: outputs in {os.path.abspath(FLAGS.workdir)}")
    return 0


def run() -> None:
    """Console-script entry point (`diffjax`)."""
    app.run(main)


if __name__ == "__main__":
    run()

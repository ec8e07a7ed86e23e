"""diffjax command line: train, sample or evaluate from an ml_collections config.

    diffjax --config=configs/default.py --workdir=work/default              # train (resumes)
    diffjax --config=configs/mnist.py --config.train.num_steps=2000 --workdir=work/mnist
    diffjax --config=configs/default.py --workdir=work/default --mode=sample
    diffjax --config=configs/default.py --workdir=work/default --mode=eval
    diffjax --config=configs/mnist.py --workdir=work/mnist --mode=sample \
        --config.inverse.operator=super_resolution --config.inverse.operator_options.factor=4
    diffjax --config=configs/mnist.py --mode=keys                           # every config key
    diffjax --config=configs/text_masked.py --workdir=work/text --mode=eval # discrete: bits/char, text samples

Without --config the embedded default (configs/default.py: 8x8 digits from scikit-learn, upscaled
to 16x16, a small U-Net) is used. Any key can be overridden with --config.<key>=<value>, options
included (--config.sample.solver=ddim --config.sample.solver_options.eta=0.5); --mode=keys lists
every key with its value and meaning.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging

import configs

DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), "default.py")
MODES = ["train", "sample", "eval", "keys"]

flags.DEFINE_string(
    "config",
    DEFAULT_CONFIG,
    "Experiment config file (defines get_config()); 'path:arg' passes "
    "arg to get_config. Override any key with --config.<key>=<value>; --mode=keys lists them.",
)
flags.DEFINE_string("workdir", "work/default", "Directory for checkpoints, metrics and samples.")
flags.DEFINE_enum(
    "mode",
    "train",
    MODES,
    "What to do: train (resumes), sample or eval a trained run (sample with config.inverse.operator set: "
    "reconstruct measured images), or keys: print every config key with its value and meaning.",
)
flags.DEFINE_string(
    "compilation_cache",
    "auto",
    "JAX's persistent compilation cache, so a second run (or --mode=sample/eval after training) reads "
    "its compiled programs back instead of compiling again: 'auto' = $JAX_COMPILATION_CACHE_DIR or "
    "~/.cache/diffjax/jax-compilation-cache ($XDG_CACHE_HOME respected), a directory, or 'off'.",
)
flags.DEFINE_enum(
    "cpu_malloc",
    "auto",
    ["auto", "off"],
    "auto: unless an accelerator plugin is installed or another allocator is preloaded, set glibc's "
    "malloc to keep freed memory (faster large CPU programs; see diffjax.training.cpu_malloc); off: leave it.",
)
flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (auto-detected on TPU pods, SLURM, Open MPI)."
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs elsewhere).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
FLAGS = flags.FLAGS

HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "-?")
_overrides: list[tuple[str, str]] = []  # the --config.<key>=<value> arguments, set by _parse_flags


def _usage() -> str:
    return f"{__doc__}\nflags:\n{FLAGS.module_help(sys.modules[__name__])}\n"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl parses the flags; the --config.<key> overrides are kept for apply_overrides."""
    from diffjax.training.config import split_config_arguments

    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(_usage())
        sys.exit(0)
    rest, overrides = split_config_arguments(argv)
    _overrides[:] = overrides
    try:
        return FLAGS(rest)
    except flags.Error as err:
        print(f"diffjax: error: {err} (see diffjax --help)", file=sys.stderr)
        sys.exit(2)


def _multi_process() -> bool:
    return bool(FLAGS.distributed or FLAGS.coordinator_address)


def _initialize_distributed() -> None:
    """Join the other processes of a multi-host run: every host runs this same program."""
    if not _multi_process():
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


def _setup_cpu_malloc() -> str:
    """First thing, before JAX's backend starts: its threads keep the arenas they first allocated from."""
    if FLAGS.cpu_malloc == "off":
        return "malloc left as is (--cpu_malloc=off)"
    from diffjax.training.cpu_malloc import tune_cpu_malloc

    return tune_cpu_malloc()


def _setup_cpu_devices(config) -> str:
    """config.mesh.cpu_devices, before JAX's backend starts (multi-process runs: left as is)."""
    if _multi_process():
        return "CPU device count left as is (multi-process run)"
    from diffjax.training.cpu_devices import cpu_device_count, split_cpu_into_devices, usable_cores

    count = cpu_device_count(
        int(config.mesh.cpu_devices),
        int(config.train.batch_size),
        int(config.eval.batch_size),
        tuple(int(config.mesh[axis]) for axis in ("data", "fsdp", "tensor")),
        usable_cores(),
    )
    return split_cpu_into_devices(count)


def _setup_compilation_cache() -> None:
    if FLAGS.compilation_cache == "off":
        return
    from diffjax.training.run import enable_compilation_cache

    directory = None if FLAGS.compilation_cache == "auto" else FLAGS.compilation_cache
    try:
        enable_compilation_cache(directory)
    except OSError as err:  # an unwritable cache must not stop a run: compile as without one
        logging.getLogger("diffjax").warning("compilation cache off: %s", err)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    malloc = _setup_cpu_malloc()
    from diffjax.training import (
        ConfigError,
        TrainingStopped,
        evaluate,
        reconstruct_from_checkpoint,
        sample_from_checkpoint,
        train,
    )
    from diffjax.training.checkpoint import CheckpointError
    from diffjax.training.config import apply_overrides, describe_config, load_config_file, validate_config

    try:
        config = apply_overrides(load_config_file(FLAGS.config), _overrides)
        if FLAGS.mode == "keys":
            print(describe_config(config))
            return 0
        validate_config(config)
    except ConfigError as err:
        print(f"diffjax: error: {err}", file=sys.stderr)
        return 2
    _setup_logging()
    logger = logging.getLogger("diffjax")
    (logger.warning if "partly" in malloc else logger.info)("%s", malloc)
    logger.info("%s", _setup_cpu_devices(config))
    _setup_compilation_cache()
    _initialize_distributed()
    try:
        if FLAGS.mode == "train":
            summary = train(config, FLAGS.workdir)
        elif FLAGS.mode == "sample" and config.inverse.operator:
            summary = reconstruct_from_checkpoint(config, FLAGS.workdir)
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
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()

"""Discrete diffusion through the shared trainer: configs/text_masked.py and configs/mnist_masked.py
shrunk to seconds train, checkpoint, resume, evaluate (bits per dim from the -ELBO) and sample through
the same `train` / `evaluate` / `sample_from_checkpoint` / `load_run` as the Gaussian runs; bad
discrete values are ConfigErrors before anything is built."""

import json
import math
import os

import helpers
import jax
import numpy as np
import pytest

from diffjax.training import ConfigError, evaluate, load_run, sample_from_checkpoint, train, validate_config
from diffjax.training.discrete_run import make_run_iterator


def tiny_text_config(**train_overrides):
    from configs.text_masked import get_config

    config = get_config()
    config.discrete.sequence_length = 16
    config.discrete.elbo_samples = 2
    config.discrete.model_options = {"hidden_size": 32, "depth": 1, "num_heads": 2, "frequency_embedding_size": 32}
    config.optim.update(warmup_steps=1, schedule="constant")
    config.train.update(
        num_steps=4, batch_size=8, log_every=2, checkpoint_every=2, progress_bar=False, async_checkpointing=False
    )
    config.train.update(train_overrides)
    config.sample.update(num_samples=3, steps=4)
    config.eval.update(batch_size=8, loss_batches=1, bits_per_dim_examples=12)
    return config


def tiny_mnist_config():
    from configs.mnist_masked import get_config

    config = get_config()
    config.data.image_size = 7
    config.discrete.elbo_samples = 2
    config.discrete.model_options = {"hidden_size": 32, "depth": 1, "num_heads": 2, "frequency_embedding_size": 32}
    config.optim.update(warmup_steps=1, schedule="constant")
    config.train.update(num_steps=2, batch_size=8, log_every=1, checkpoint_every=2, progress_bar=False)
    config.train.async_checkpointing = False
    config.sample.update(num_samples=4, steps=3)
    config.eval.update(batch_size=8, loss_batches=1, bits_per_dim_examples=8)
    return config


def test_text_run_trains_checkpoints_and_samples(tmp_path):
    """The default-run check (one device, one step: a compile of each program): the text batches,
    the loss, a checkpoint with the discrete config, and text samples."""
    summary = train(tiny_text_config(num_steps=1), str(tmp_path), devices=jax.devices()[:1])
    assert summary["step"] == 1 and os.listdir(tmp_path / "checkpoints") == ["1"]
    # the loss is nats per character; at initialisation (zero logits) its expectation is log(96)
    assert 0.5 * math.log(96) < summary["loss"] < 1.5 * math.log(96)
    text = open(summary["samples"]).read()
    assert summary["samples"].endswith(".txt") and text.count("=== sample") == 3


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A tiny text run on the 8-device mesh trained to step 2, then resumed to step 4."""
    workdir = str(tmp_path_factory.mktemp("text_masked"))
    first = train(tiny_text_config(num_steps=2), workdir)
    resumed = train(tiny_text_config(), workdir)
    return workdir, first, resumed


@pytest.mark.slow
def test_text_run_resumes(text_run):
    workdir, first, resumed = text_run
    assert first["step"] == 2 and resumed["step"] == 4
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    logged = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert logged == [2, 4]  # the resumed run continued at step 3
    assert 0 < resumed["loss"] < 1.5 * math.log(96)


@pytest.mark.slow
def test_text_run_evaluates_and_samples(text_run):
    workdir, _, _ = text_run
    config = tiny_text_config()
    summary = evaluate(config, workdir)
    assert summary["split"] == "validation" and summary["step"] == 4
    bits = summary["bits_per_dim"]
    assert bits["examples"] == 12 and 0 < bits["bits_per_dim"] < 1.5 * math.log2(96)
    assert os.path.exists(os.path.join(workdir, "eval_step_0000004.json"))
    assert open(summary["samples"]).read().count("=== sample") == 3
    sampled = sample_from_checkpoint(config, workdir)
    tokens = np.load(sampled["npz"])["tokens"]
    assert tokens.shape == (3, 16) and tokens.min() >= 0 and tokens.max() < 96  # no mask left
    assert load_run(workdir).step == 4
    config.discrete.sampler = "block"  # block diffusion from the same checkpoint
    config.discrete.sampler_options = {"block_size": 4, "inner": "ancestral"}
    tokens = np.load(sample_from_checkpoint(config, workdir)["npz"])["tokens"]
    assert tokens.shape == (3, 16) and tokens.min() >= 0 and tokens.max() < 96


def test_text_iterator_resumes_exactly():
    config = tiny_text_config()

    def iterator():
        return make_run_iterator(config, split="train", global_batch_size=4, seed=3)

    uninterrupted = iterator()
    batches = [next(uninterrupted)["tokens"] for _ in range(3)]
    first = iterator()
    next(first)
    resumed = iterator()
    resumed.set_state(first.get_state())
    np.testing.assert_array_equal(next(resumed)["tokens"], batches[1])
    np.testing.assert_array_equal(next(resumed)["tokens"], batches[2])
    assert not np.array_equal(batches[0], batches[1])


@pytest.mark.parametrize("levels", [2, 256])
def test_pixel_tokens_are_the_data_levels(levels):
    from diffjax.training.discrete_run import images_from_tokens, tokens_from_images

    uint8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    images = uint8.astype(np.float32) / 127.5 - 1.0  # the image pipeline's scaling
    tokens = np.asarray(tokens_from_images(images, levels))
    expected = uint8[..., 0] if levels == 256 else (uint8[..., 0] > 127).astype(np.int32)
    np.testing.assert_array_equal(tokens, expected)
    np.testing.assert_array_equal(np.asarray(tokens_from_images(images_from_tokens(tokens, levels), levels)), tokens)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("vocab_size", 1, r"config.discrete.vocab_size = 1 is not allowed; expected 0 \(the data's own\) or an int"),
        ("vocab_size", 50, r"config.discrete.vocab_size = 50 .* 0 or 96"),
        ("mask_id", 5, r"config.discrete.mask_id = 5 .* -1 or 96 \(vocab_size\): 5 is inside the vocabulary"),
        ("process", "gaussian", r"config.discrete.process = 'gaussian' .* one of \['d3pm', 'masked', 'uniform'\]"),
        ("sampler", "euler", r"config.discrete.sampler = 'euler' .* one of \['ancestral', 'block', 'confidence'"),
        ("loss", "d3pm", r"config.discrete.loss = 'd3pm' .* one of \['masked_elbo', 'd3pm_hybrid'\]"),
        ("model_options", {"width": 3}, r"config.discrete.model_options = .*unknown: \['width'\]"),
    ],
)
def test_bad_discrete_values_are_config_errors(key, value, message):
    config = tiny_text_config()
    with config.discrete.ignore_type():
        config.discrete[key] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_bad_discrete_combinations_are_refused_before_compiling(tmp_path):
    from diffjax.training.loop import prepare_run

    config = tiny_text_config()
    config.sample.steps = 0
    with pytest.raises(ConfigError, match=r"config.sample.steps = 0 is not allowed; expected a positive int"):
        validate_config(config)
    config = tiny_text_config()
    config.discrete.update(process="uniform", loss="d3pm_hybrid", time_free=False, cache=False)
    config.discrete.sampler = "first_hitting"  # masked process only: refused when the run is built
    with pytest.raises(ConfigError, match=r"config.discrete.sampler: .*MaskedProcess"):
        prepare_run(config, str(tmp_path))
    config = tiny_text_config()
    config.discrete.sampler = "block"
    config.discrete.sampler_options = {"block_size": 5}  # windows of 16
    with pytest.raises(ConfigError, match=r"config.discrete.sampler_options: .*block_size 5 does not divide the 16"):
        prepare_run(config, str(tmp_path))
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_mnist_run_trains_and_evaluates(tmp_path):
    config = tiny_mnist_config()
    summary = train(config, str(tmp_path))
    assert summary["samples"].endswith(".png") and summary["step"] == 2
    result = evaluate(config, str(tmp_path))
    assert result["split"] == "test" and result["samples"].endswith(".png")
    assert 0 < result["bits_per_dim"]["bits_per_dim"] < 2.0  # binarised: log2(2) = 1 at initialisation
    images = np.load(sample_from_checkpoint(config, str(tmp_path))["npz"])["images"]
    assert images.shape == (4, 7, 7, 1) and set(np.unique(images)) <= {0, 255}
    assert jax.tree.leaves(load_run(str(tmp_path)).ema_params)


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------

# tiny_text_config(num_steps=2) as command-line flags
TINY_TEXT_FLAGS = [
    "--config=configs/text_masked.py",
    "--config.discrete.sequence_length=16",
    "--config.discrete.elbo_samples=2",
    "--config.discrete.model_options.hidden_size=32",
    "--config.discrete.model_options.depth=1",
    "--config.discrete.model_options.num_heads=2",
    "--config.discrete.model_options.frequency_embedding_size=32",
    "--config.optim.warmup_steps=1",
    "--config.optim.schedule=constant",
    "--config.train.num_steps=2",
    "--config.train.batch_size=8",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=2",
    "--config.train.progress_bar=False",
    "--config.train.async_checkpointing=False",
    "--config.sample.num_samples=3",
    "--config.sample.steps=4",
    "--config.eval.batch_size=8",
    "--config.eval.loss_batches=1",
    "--config.eval.bits_per_dim_examples=12",
]


def _last_json(stdout: str) -> dict:
    """The summary the command line prints last (a JSON object before its 'outputs in' line)."""
    start = stdout.rindex("\n{\n") + 1 if "\n{\n" in stdout else stdout.index("{\n")
    return json.loads(stdout[start : stdout.rindex("\n}") + 2])


@pytest.mark.slow
def test_cli_trains_evaluates_and_samples_a_text_run(tmp_path):
    """configs/text_masked.py through experiments/main.py: train 2 steps, --mode=eval (validation
    bits per character, text samples), --mode=sample (a text file and the tokens)."""
    workdir = str(tmp_path / "text")
    trained = helpers.run_cli(f"--workdir={workdir}", *TINY_TEXT_FLAGS)
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = _last_json(trained.stdout)
    assert summary["step"] == 2 and os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
    assert open(summary["samples"]).read().count("=== sample") == 3

    evaluated = helpers.run_cli(f"--workdir={workdir}", "--mode=eval", *TINY_TEXT_FLAGS)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    written = json.load(open(os.path.join(workdir, "eval_step_0000002.json")))
    bits = written["bits_per_dim"]
    assert written["split"] == "validation" and bits["examples"] == 12
    assert 0 < bits["bits_per_dim"] < 1.5 * math.log2(96)  # at most ~uniform over 96 characters after 2 steps
    assert written["samples"].endswith(".txt") and open(written["samples"]).read().count("=== sample") == 3

    sampled = helpers.run_cli(f"--workdir={workdir}", "--mode=sample", *TINY_TEXT_FLAGS)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    out = _last_json(sampled.stdout)
    assert out["step"] == 2 and out["grid"].endswith(".txt")
    assert open(out["grid"]).read().count("=== sample") == 3
    tokens = np.load(out["npz"])["tokens"]
    assert tokens.shape == (3, 16) and tokens.min() >= 0 and tokens.max() < 96  # no mask left


@pytest.mark.slow
def test_cli_refuses_a_bad_discrete_value_with_exit_code_2(tmp_path):
    done = helpers.run_cli(f"--workdir={tmp_path / 'run'}", *TINY_TEXT_FLAGS, "--config.discrete.sampler=euler")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "config.discrete.sampler = 'euler' is not allowed" in done.stderr
    assert not os.path.exists(tmp_path / "run")

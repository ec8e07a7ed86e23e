"""Masked diffusion on MNIST pixels (mnist.npz in the shared data directory): the digits box-filtered
to 14x14 and binarised at mid-grey (`get_config()`; `configs/mnist_masked.py:256` keeps the 8-bit
grey levels), 196 pixel tokens for the pixel variant of SequenceTransformer (2-D sin-cos positions,
hidden 64, depth 2). The discrete family's settings otherwise (configs/text_masked.py). Eval reports
test bits per dim (-ELBO) and writes a sample grid."""

from configs import text_masked
from diffjax.data import default_data_config


def get_config(levels: str = "2"):
    config = text_masked.get_config()
    config.data = default_data_config("mnist")
    config.data.image_size = 14
    config.data.resize_method = "box"
    config.data.num_classes = 0  # unconditional: labels are not read

    config.discrete.tokens = "pixels"
    config.discrete.vocab_size = int(levels)
    config.discrete.model_options = {"hidden_size": 64, "depth": 2}

    config.train.batch_size = 32
    config.sample.num_samples = 16
    config.sample.steps = 196  # one step per pixel
    config.eval.batch_size = 64
    config.eval.bits_per_dim_examples = 256
    return config

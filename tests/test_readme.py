"""The README's library examples run as written (the load-run example runs in test_training.py)."""

import helpers
import numpy as np


def test_toy_training_example_learns_the_ring():
    """The toy block trains an MLP on 8 Gaussians on the unit circle (std 0.1) for 300 steps: its
    samples must lie near the circle and visit every component."""
    namespace = {}
    exec(helpers.readme_example("toy"), namespace)
    samples = np.asarray(namespace["samples"])
    assert samples.shape == (1000, 2) and np.all(np.isfinite(samples))
    radius = np.linalg.norm(samples, axis=1)
    assert abs(np.median(radius) - 1.0) < 0.15, np.median(radius)
    data = namespace["data"]
    nearest = np.argmin(np.linalg.norm(samples[:, None, :] - np.asarray(data.means)[None], axis=-1), axis=1)
    counts = np.bincount(nearest, minlength=data.means.shape[0])
    assert counts.min() > 40, counts  # every component visited (125 expected each)

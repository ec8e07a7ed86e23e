"""Small test doubles shared by several test files."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# XLA flags for every test process and the subprocesses it starts: the suite compiles thousands of
# small programs and runs few of them for long, so LLVM's cheapest optimisation saves more compile
# time than it costs in run time (the default run: 16 min instead of 22.5 on 2 cores, every test
# passing either way).
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


class CountingNetwork:
    """An identity network that records its calls, so a test can show that validation happened
    before anything was traced."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return x


def perturbed(params, seed=0):
    """Every parameter N(0, 0.2^2): zero-initialised layers (DiT's adaLN-zero, the U-Nets' output
    layers) would otherwise hide parts of a network from its output and gradients."""
    import jax  # here, not at the top: conftest imports this module before it sets up JAX

    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tree.unflatten([0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def readme_example(name: str) -> str:
    """The Python block of README.md marked `<!-- readme-example: name -->`, verbatim."""
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    marker = f"<!-- readme-example: {name} -->\n```python\n"
    start = readme.index(marker) + len(marker)
    return readme[start : readme.index("```", start)]


def run_cli(*args, timeout: float = 600):
    """Run the command line (experiments/main.py, what the `diffjax` script calls) from the repository
    root in a fresh process; returns the CompletedProcess with its text output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(REPO / "experiments" / "main.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env=env,
    )

"""Small test doubles shared by several test files."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


class CountingNetwork:
    """An identity network that records its calls, so a test can show that validation happened
    before anything was traced."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return x


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

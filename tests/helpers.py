"""Small test doubles shared by several test files."""

import pathlib


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

"""Small test doubles shared by several test files."""


class CountingNetwork:
    """An identity network that records its calls, so a test can show that validation happened
    before anything was traced."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return x

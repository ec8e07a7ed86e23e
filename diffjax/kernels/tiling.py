"""Choosing tile sizes for sequences of any length (the kernels need seq a multiple of the tile)."""

import dataclasses
from typing import ClassVar

TILE_FIELDS = ("block_q", "block_k", "block_q_bwd", "block_k_bwd")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def powers_of_two(smallest: int, largest: int) -> list[int]:
    sizes, b = [], smallest
    while b <= largest:
        sizes.append(b)
        b *= 2
    return sizes


def choose_block(seq: int, preferred: int, smallest: int, slack: float = 0.125) -> int:
    """Largest power-of-two tile in [smallest, preferred] whose padded length round_up(seq, tile)
    is within `slack` of the least any candidate gives (big tiles are fast, padding is waste)."""
    candidates = powers_of_two(smallest, max(smallest, preferred))
    least = min(round_up(seq, b) for b in candidates)
    return max(b for b in candidates if round_up(seq, b) <= least * (1 + slack))


def largest_power_of_two_divisor(n: int) -> int:
    return n & -n


def fit_pair(seq: int, preferred_fwd: int, preferred_bwd: int, smallest: int) -> tuple[int, int]:
    """(forward tile, backward tile) sharing one padded length: the forward tile sets the padding,
    the backward tile is capped to a power of two dividing it."""
    fwd = choose_block(seq, preferred_fwd, smallest)
    padded = round_up(seq, fwd)
    bwd = max(smallest, min(preferred_bwd, largest_power_of_two_divisor(padded)))
    return fwd, bwd


def check_tiles(blocks, fields, smallest: int):
    """ValueError unless every named field of `blocks` is a power of two >= smallest."""
    for name in fields:
        size = getattr(blocks, name)
        if not (isinstance(size, int) and size >= smallest and size & (size - 1) == 0):
            raise ValueError(f"{type(blocks).__name__}.{name}={size!r}; must be a power of two >= {smallest}.")


class TileSizes:
    """What the backends' frozen block-size dataclasses share: the forward tiles block_q, block_k and
    the backward tiles block_q_bwd, block_k_bwd, powers of two >= the backend's `smallest`."""

    smallest: ClassVar[int]

    def __post_init__(self):
        check_tiles(self, TILE_FIELDS, self.smallest)

    @property
    def seq_q_multiple(self) -> int:
        return max(self.block_q, self.block_q_bwd)

    @property
    def seq_k_multiple(self) -> int:
        return max(self.block_k, self.block_k_bwd)

    def fitted(self, seq_q: int, seq_k: int):
        """These tiles shrunk for short or ragged sequences (see fit_pair)."""
        block_q, block_q_bwd = fit_pair(seq_q, self.block_q, self.block_q_bwd, self.smallest)
        block_k, block_k_bwd = fit_pair(seq_k, self.block_k, self.block_k_bwd, self.smallest)
        return dataclasses.replace(
            self, block_q=block_q, block_k=block_k, block_q_bwd=block_q_bwd, block_k_bwd=block_k_bwd
        )

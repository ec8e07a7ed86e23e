"""Equality with MD4 (google-deepmind/md4, Shi et al. 2024) on the same inputs: its masking schedules
(linear, cosine, polynomial; GenMD4's learnable state-dependent polynomial), its continuous- and
discrete-time ELBO losses, its antithetic time sampling and its ancestral sampling step, against ours.

The fixture (tests/fixtures/md4/md4_reference.npz) holds MD4's numbers, made by
`python -m experiments.peers.make_md4_fixtures --md4 <checkout>` from a run of its code with fixed
logits as the network; md4 is not needed here. Tokens must agree exactly (the same Gumbel noise from
MD4's key), real numbers to float32 precision. The default run checks the cosine schedule (with
GenMD4 and MD4's loss as a whole); the slow run every schedule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from experiments.peers.make_md4_fixtures import SCHEDULES, VOCAB, max_relative_error, ours

FIXTURE = Path(__file__).parent / "fixtures" / "md4" / "md4_reference.npz"
RTOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def pairs(reference):
    return ours(reference, ("cosine",))


def check_equal(reference, pairs):
    masked = reference["z_partial"] == VOCAB
    for name, (mine, theirs) in pairs.items():
        assert mine.shape == theirs.shape, name
        if "_step_" in name:
            revealed = masked & (theirs != VOCAB)
            assert 0 < revealed.sum() < masked.sum(), name  # the step unmasks some positions, not all
            np.testing.assert_array_equal(mine, theirs, err_msg=name)
        else:
            if "loss" in name:
                assert np.count_nonzero(theirs) >= theirs.size // 2, name  # mostly examples with masked positions
            assert max_relative_error(mine, theirs) < RTOL, (name, max_relative_error(mine, theirs))


def test_cosine_schedule_losses_step_genmd4_and_the_whole_loss_equal_md4(reference, pairs):
    kinds = ["alpha", "dalpha", "weight", "loss_cont", "loss_T20", "step_uniform", "step_cosine"]
    assert sorted(pairs) == sorted(
        [f"cosine_{k}" for k in kinds]
        + [f"genmd4_{k}" for k in ("alpha", "dalpha", "weight", "loss")]
        + ["call_t", "call_loss"]
    )
    check_equal(reference, pairs)


@pytest.mark.slow
def test_every_schedule_equals_md4(reference):
    pairs = ours(reference)
    assert len(pairs) == 7 * len(SCHEDULES) + 6
    check_equal(reference, pairs)


def test_a_different_schedule_misses_by_far_more_than_the_tolerance(reference, pairs):
    """The comparison can fail: MD4's linear / polynomial numbers against our cosine ones."""
    assert max_relative_error(pairs["cosine_alpha"][0], reference["linear_alpha"]) > 1e-2
    assert max_relative_error(pairs["cosine_loss_cont"][0], reference["linear_loss_cont"]) > 1e-2
    assert np.mean(pairs["cosine_step_uniform"][0] != reference["poly3_step_uniform"]) > 0.05

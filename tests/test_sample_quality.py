"""experiments/sample_quality.py's pieces: solver specs with a grid, the error column, the error itself."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import sample_quality as Q
from experiments.benchmarks.common import relative_error


def test_a_solver_spec_names_options_and_a_grid():
    assert Q.parse_solver("unipc") == ("unipc", {}, "")
    assert Q.parse_solver("unipc:order=3;variant=bh1@karras") == ("unipc", {"order": 3, "variant": "bh1"}, "karras")
    assert Q.parse_solver("gaussian_pc@flow_time") == ("gaussian_pc", {}, "flow_time")
    with pytest.raises(ValueError, match=r"grid 'karas'.*use one of"):
        Q.parse_solver("unipc@karas")
    with pytest.raises(ValueError, match="not of the form option=value"):
        Q.parse_solver("unipc:order")


def test_the_error_against_the_reference_is_relative_to_the_references_spread():
    ref = np.random.default_rng(0).normal(size=(50, 7)) + 3.0
    assert relative_error(ref, ref) == 0.0
    # x = ref + c (ref - mean ref): error |c|, whatever the mean
    assert relative_error(ref + 0.25 * (ref - ref.mean(0)), ref) == pytest.approx(0.25)


def test_rows_with_errors_show_them_per_row_and_as_the_mean_over_seeds():
    def row(solver, seed, fid, error):
        return {"solver": solver, "steps": 4, "nfe": 5, "seed": seed, "fid": fid, "kid_x1e3": 1.0,
                "kid_std_x1e3": 0.1, "sampling_seconds": 1.0, "error": error}  # fmt: skip

    headers, table = Q.quality_table([row("unipc", 0, 10.0, 0.5)], [0], 100)
    assert headers[-1] == "error vs reference" and table[0][-1] == "0.5000"
    rows = [row("unipc", 0, 10.0, 0.25), row("unipc", 1, 12.0, 0.75)]
    headers, table = Q.quality_table(rows, [0, 1], 100)
    assert headers[-1] == "error vs reference (mean)" and table[0][-1] == "0.5000"
    assert table[0][5] == "11.00 ± 1.00"
    rows = [{k: v for k, v in r.items() if k != "error"} for r in rows]  # no --reference: no column
    assert "error vs reference (mean)" not in Q.quality_table(rows, [0, 1], 100)[0]
    assert "error vs reference" not in Q.quality_table(rows[:1], [0], 100)[0]


def test_the_plan_puts_the_reference_first_and_refuses_bad_specs_before_any_work():
    from absl import app

    plan = Q.sampling_plan(["unipc", "gaussian_pc@flow_time"], ["5", "10"], "dpm_solver++:order=3@karras:99")
    assert plan[0] == ("dpm_solver++:order=3@karras", 99, 100)
    assert plan[1:] == [("unipc", 4, 5), ("gaussian_pc@flow_time", 4, 5), ("unipc", 9, 10),
                        ("gaussian_pc@flow_time", 9, 10)]  # fmt: skip
    assert Q.sampling_plan(["ddim"], ["5"], "") == [("ddim", 4, 5)]
    for solvers, nfes, reference, match in [
        (["unipc@karas"], ["5"], "", "grid 'karas'"),
        (["unipcc"], ["5"], "", "unipcc"),
        (["unipc"], ["five"], "", "--nfe=five"),
        (["unipc"], ["5"], "ddim", "--reference='ddim'"),
        (["unipc"], ["5"], "ddim@karas:10", "grid 'karas'"),
        (["unipc"], ["5"], "dim:10", "--reference='dim:10'.*dim"),
    ]:
        with pytest.raises(app.UsageError, match=match):
            Q.sampling_plan(solvers, nfes, reference)

"""Each solver's per-step options through the sampler suite (issue 17): which defaults the suite supports.

Runs groups of (solver, options) @ grid settings on the suite's default-size problems at NFE 5, 10, 20
(sampler_suite.run_suite, no peers), each group saved on its own as it goes (`--group`, resumable), and
merges them with the committed suite run (experiments/results/sampler_suite.json: its diffusers rows and
our settings it already has) so that "best" is over everything measured on the same noise. The current
default runs again in the first group; its errors against the committed run's are reported (a
reproducibility check). Ratios, floors and classes are sampler_selection's.

    python experiments/benchmarks/sampler_defaults_review.py --group unipc   # one group (resumes)
    python experiments/benchmarks/sampler_defaults_review.py --report        # merge and write the review

Writes experiments/results/sampler_defaults_review.json (every row the review needs) and .md; the groups'
files (results/sampler_defaults_review.<group>.partial.json) are working files, not kept. Stochastic
solvers are left out: the suite's error is against the probability-flow solution from the same noise,
which they do not follow.
"""

from __future__ import annotations

import argparse
import json
import os

import jax

from diffjax.io import atomic_write_json, atomic_write_text
from experiments.benchmarks import sampler_selection as S
from experiments.benchmarks.common import RESULTS_DIR, markdown_table, write_results
from experiments.benchmarks.sampler_suite import Method, run_suite

NAME = "sampler_defaults_review"
NFES = S.SELECTION_NFES
BASELINE = Method("unipc", (), "logsnr")  # the default solver beyond FEW_STEPS, on its default grid


def _m(solver, grid, **options):
    return Method(solver, tuple(options.items()), grid)


# (group, solver, methods): the solver's current defaults first, then the alternatives a user would try.
GROUPS = {
    "unipc": [
        BASELINE,
        _m("unipc", "linspace"),
        _m("unipc", "logsnr", order=3),
        _m("unipc", "linspace", order=3),
        _m("unipc", "logsnr", variant="bh1"),
        _m("unipc", "logsnr", corrector=False),
        _m("unipc", "logsnr", lower_order_final="none"),
        _m("unipc", "logsnr", lower_order_final="last_steps"),
    ],
    "dpm_solver++": [
        _m("dpm_solver++", "logsnr"),
        _m("dpm_solver++", "logsnr", lower_order_final="none"),
        _m("dpm_solver++", "logsnr", order=3, quadratic_weight="halved"),
        _m("dpm_solver++", "logsnr", order=3, lower_order_final="none"),
    ],
    "deis": [
        _m("deis", "logsnr"),
        _m("deis", "logsnr", order=2),
        _m("deis", "logsnr", polynomial="log_rho"),
        _m("deis", "logsnr", lower_order_final="none"),
    ],
    "gaussian_pc": [
        _m("gaussian_pc", "flow_time", corrector=False),
        _m("gaussian_pc", "flow_time", order=1),
    ],
    "other": [
        _m("dpm_solver", "logsnr"),
        _m("dpm_solver", "logsnr", order=2),
        _m("dpm_solver", "logsnr", data_prediction=True),
        _m("ddim", "logsnr"),
        _m("edm_heun", "karras"),
        _m("heun", "logsnr"),
    ],
}
# The committed suite's settings of the same solvers, shown in the review beside the new ones.
SUITE_SETTINGS = {
    "unipc": ("unipc(order=2) @ logsnr", "unipc(order=2) @ linspace", "unipc() @ karras", "unipc() @ flow_time"),
    "dpm_solver++": ("dpm_solver++(order=3) @ logsnr", "dpm_solver++(order=2) @ karras"),
    "gaussian_pc": ("gaussian_pc() @ flow_time", "gaussian_pc() @ logsnr"),
    "other": ("heun() @ karras",),
}
SUITE = "sampler_suite"


def partial_path(group: str) -> str:
    return os.path.join(RESULTS_DIR, f"{NAME}.{group}.partial.json")


def run_group(group: str) -> None:
    """Run one group on every entry, saving after each; entries already saved are kept."""
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/diffjax_suite_jax"))
    path = partial_path(group)
    done = json.load(open(path)) if os.path.exists(path) else None

    def save(payload):
        atomic_write_json(path, payload)

    save(run_suite(peers=False, methods=GROUPS[group], nfes=NFES, save=save, done=done))


def merged_payload(suite: dict, partials: dict) -> dict:
    """The committed suite's references and rows (at NFES), plus every group's rows."""
    rows = [r for r in suite["rows"] if r["nfe"] in NFES]
    parts = partials.items()
    for group, part in parts:
        rows += [{**r, "group": group} for r in part["rows"]]
    return {
        "full": False,
        "nfes": list(NFES),
        "suite_run": suite["environment"]["date"],
        "groups": {g: [m.label for m in GROUPS[g]] for g in partials},
        "unfinished": {
            g: sorted({r["entry"] for r in suite["references"]} - {r["entry"] for r in p["references"]})
            for g, p in parts
        },  # fmt: skip
        "seconds": {g: p["seconds"] for g, p in parts},
        "cpu_seconds": {g: p["cpu_seconds"] for g, p in parts},
        "references": suite["references"],
        "reference_gaps_rerun": {g: {r["entry"]: r["reference_gap"] for r in p["references"]} for g, p in parts},
        "rows": rows,
    }


def baseline_errors(payload, rerun: bool) -> dict:
    """{(entry, nfe): error} of the current default, from the rerun here or from the committed suite run."""
    return {
        (r["entry"], r["nfe"]): r["error"]
        for r in payload["rows"]
        if bool(r.get("group")) == rerun and r["method"] == BASELINE.label
    }


def reproducibility(payload) -> float:
    """Largest relative difference between the baseline's errors here and in the committed suite run."""
    new, old = baseline_errors(payload, True), baseline_errors(payload, False)
    diffs = [abs(new[k] - old[k]) / max(old[k], 1e-12) for k in new if k in old]
    return max(diffs) if diffs else float("nan")


def review_rows(payload) -> list[dict]:
    """The merged rows with the current default once (the committed run's row)."""
    return [r for r in payload["rows"] if not (r.get("group") and r["method"] == BASELINE.label)]


def fmt(x, digits) -> str:
    """sampler_selection's number format, with "inf" for a non-finite error (NaN counts as inf there)."""
    return "inf" if x == float("inf") else S._fmt(x, digits)


def review_table(payload, methods):
    """Per setting and class (the four non-DDPM processes together): worst floored ratio to the best
    method (ours and diffusers) at each NFE, and the worst over classes and NFEs."""
    rows = review_rows(payload)
    table, classes = S.error_table(rows)
    floors = S.error_floors(payload["references"])
    merged = {e: ("sweep" if c.startswith("sweep:") else c) for e, c in classes.items()}
    head = ["setting"] + [f"{t} ({'/'.join(map(str, NFES))})" for t in S.CLASS_TITLES.values()] + ["worst"]
    body, scores = [], {}
    for m in methods:
        summary = S.class_summary(table, merged, m, NFES, floors)
        cells, worst = [m], 0.0
        for cls in S.CLASS_TITLES:
            values = [summary.get((cls, n), {}).get("worst_ratio_to_best", float("nan")) for n in NFES]
            worst = max([worst] + [v for v in values if v == v])
            cells.append(" / ".join(fmt(v, 2) for v in values))
        scores[m] = worst
        body.append(cells + [fmt(worst, 3)])
    return markdown_table(head, body), scores


def class_cells(payload, method) -> dict:
    """{(class, nfe): worst floored ratio to the best} for one setting (classes as in `review_table`)."""
    rows = review_rows(payload)
    table, classes = S.error_table(rows)
    merged = {e: ("sweep" if c.startswith("sweep:") else c) for e, c in classes.items()}
    summary = S.class_summary(table, merged, method, NFES, S.error_floors(payload["references"]))
    return {k: v["worst_ratio_to_best"] for k, v in summary.items()}


def dominating(payload, base: str, methods) -> list[tuple[str, int]]:
    """Settings at least as good as `base` (within sampler_selection.TIE) in every class and NFE, with the
    number of (class, NFE) cells where they are better by more than TIE."""
    reference = class_cells(payload, base)
    out = []
    for m in methods:
        cells = class_cells(payload, m)
        if m == base or any(not cells.get(k, float("inf")) <= S.TIE * v for k, v in reference.items()):
            continue
        out.append((m, sum(cells[k] * S.TIE < v for k, v in reference.items())))
    return out


def describe_win(win) -> str:
    method, cells = win
    if cells == 0:
        return f"`{method}` ties it (within 5 %) in every class and NFE"
    total = len(NFES) * len(S.CLASS_TITLES)
    return f"`{method}` is as good in every class and NFE, and better by more than 5 % in {cells} of {total}"


def error_ratios(payload, method: str, base: str) -> dict:
    """{(class, nfe): (geometric mean, min, max)} over the class's entries of base's error / method's error,
    both floored at the entry's floor (> 1: `method` is better)."""
    table, classes = S.error_table(review_rows(payload))
    floors = S.error_floors(payload["references"])
    out = {}
    for cls in S.CLASS_TITLES:
        for nfe in NFES:
            values = [
                S.ratio(errors[base], errors[method], floors[e])
                for e, c in classes.items()
                if (c == cls or (cls == "sweep" and c.startswith("sweep:")))
                and method in (errors := table.get((e, nfe), {}))
                and base in errors
            ]
            if values:
                out[(cls, nfe)] = (S.geomean(values), min(values), max(values))
    return out


def comparison_table(payload, method: str, base: str) -> str:
    head = ["class"] + [f"NFE {n}: geomean (min-max)" for n in NFES]
    ratios = error_ratios(payload, method, base)
    body = []
    for cls, title in S.CLASS_TITLES.items():
        cells = [ratios.get((cls, n)) for n in NFES]
        body.append([title] + [f"{c[0]:.2f} ({c[1]:.2f}-{c[2]:.2f})" if c else "-" for c in cells])
    return markdown_table(head, body)


# Each group's solver default, against which its other settings are compared.
GROUP_DEFAULTS = {
    "unipc": BASELINE.label,
    "dpm_solver++": "dpm_solver++() @ logsnr",
    "deis": "deis() @ logsnr",
    "gaussian_pc": "gaussian_pc() @ flow_time",
    "other": "dpm_solver() @ logsnr",
}
CANDIDATE_3 = "unipc(order=3) @ linspace"


def ranking_table(payload):
    """Every diffjax setting measured (here and in the suite run), by sampler_selection.minimax on the
    selection entries, with its worst ratio on the selection, held-out and all entries."""
    rows = review_rows(payload)
    table, classes = S.error_table(rows)
    floors = S.error_floors(payload["references"])
    ours = sorted({r["method"] for r in rows if r["library"] == "diffjax"})
    ranked, on_sel, on_held, on_all, _, _ = S.minimax(table, classes, ours, floors)

    def where(w):
        return f"{w[0]} @ {w[1]}" if w else "-"

    body = [[m, fmt(on_sel[m][0], 3), where(on_sel[m][1]), fmt(on_held[m][0], 3), fmt(on_all[m][0], 3)]
            for m in ranked]  # fmt: skip
    head = ["setting (minimax order)", "worst ratio, selection", "where", "held out", "all"]
    return markdown_table(head, body), ranked


def write_review(payload) -> str:
    env = payload.get("environment", {})
    lines = [
        "# Per-step defaults of every solver through the sampler suite",
        "",
        f"{env.get('date', '')}, {env.get('device', '')} ({env.get('cpu_count', '')} cores, shared with other "
        f"jobs), jax {env.get('versions', {}).get('jax', '')}; default-size suite, NFE {', '.join(map(str, NFES))}; "
        f"best and floors over every setting here and in the committed suite run ({payload['suite_run']}, its "
        "diffusers rows included). Made by `experiments/benchmarks/sampler_defaults_review.py`.",
        "",
        "Cells: the setting's worst floored ratio to the best method per class over all 22 entries, selection and"
        " held-out (sampler_selection.class_summary; 1 = best on every entry of the class) at NFE 5 / 10 / 20;"
        " the first row of each solver is its current default. The process sweep is VP, cosine, EDM and flow"
        " matching together.",
        "",
        f"Reproducibility: the current default rerun here differs from the committed run by at most "
        f"{reproducibility(payload):.1e} (relative error difference).",
        "",
    ]
    ranking, ranked = ranking_table(payload)
    better = dominating(payload, BASELINE.label, ranked)
    lines += ["## Settings at least as good as the current default in every class and NFE", ""]
    lines += [f"- {describe_win(w)}" for w in better] or ["None."]
    lines += ["", f"## `{CANDIDATE_3}` against the current default", "",
              "The default's error over the candidate's (floored as in the ratios; > 1: the candidate is better), "
              "over each class's entries:", "", comparison_table(payload, CANDIDATE_3, BASELINE.label)]  # fmt: skip
    lines += ["", "## Every setting by the selection's minimax", "", ranking, ""]
    for group, labels in payload["groups"].items():
        methods = list(labels) + [m for m in SUITE_SETTINGS.get(group, ()) if m not in labels]
        table, _ = review_table(payload, methods)
        missing = payload["unfinished"][group]
        note = f" (unfinished: {len(missing)} entries missing: {', '.join(missing)})" if missing else ""
        wall = payload["seconds"][group]
        base = GROUP_DEFAULTS[group]
        solver = base.split("(")[0]
        wins = dominating(payload, base, [m for m in methods if m.split("(")[0] == solver])
        verdict = "; ".join(map(describe_win, wins)) or "no other setting is as good in every class and NFE"
        lines += [f"## {group}{note}", "", f"Run time {wall / 60:.1f} min wall. Against `{base}`: {verdict}.",
                  "", table, ""]  # fmt: skip
    return "\n".join(lines)


def report() -> None:
    """Merge the groups' partial files with the committed suite run into <NAME>.json and write <NAME>.md;
    without partial files, rewrite <NAME>.md from <NAME>.json (which holds every row it needs)."""
    partials = {}
    for group in GROUPS:
        if os.path.exists(partial_path(group)):
            with open(partial_path(group)) as f:
                partials[group] = json.load(f)
    path = os.path.join(RESULTS_DIR, f"{NAME}.json")
    if partials:
        with open(os.path.join(RESULTS_DIR, f"{SUITE}.json")) as f:
            suite = json.load(f)
        path = write_results(NAME, merged_payload(suite, partials))
    with open(path) as f:
        payload = json.load(f)
    atomic_write_text(os.path.join(RESULTS_DIR, f"{NAME}.md"), write_review(payload) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", choices=list(GROUPS), help="run one group (resumes its partial file)")
    parser.add_argument("--report", action="store_true", help="merge the groups and write the review")
    args = parser.parse_args(argv)
    if args.group:
        run_group(args.group)
    if args.report:
        report()


if __name__ == "__main__":
    main()

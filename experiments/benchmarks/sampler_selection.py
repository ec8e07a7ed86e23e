"""Choosing the default sampler from the sampler suite's results by its worst case, and the suite's report.

For every entry (problem under a process) and NFE, a method's ratio is its error over the smallest error
any method (ours or diffusers') reached there, both floored at the entry's error floor: the larger of the
reference's own convergence error (the relative gap between its N- and 2N-step solves; 0 for the closed-form
Gaussian references), ERROR_FLOOR = 1e-3, and on image sets the metric's resolution: the error that one
sample of the batch at another training image than the reference's causes (sampler_suite.one_sample_error).
Below the floor errors are not resolved, so they count as ties: image samples end exactly on training
images, so a batch that all lands on the reference's images has error ~1e-7 and one that differs in one
sample of 200 has ~0.1; without the resolution floor that one sample would be a ratio of ~1e5 (or 1e2 with
the 1e-3 floor), and a handful of such collapses would decide the whole selection.

A candidate's score is its worst ratio over the entries and
the NFEs 5, 10 and 20; the default is the candidate with the smallest score (`minimax`; scores within 5 %
are ties, broken by the next-worst ratio, and so on). To guard against
fitting the suite, the choice is made on the selection entries only, and the held-out entries (one
problem per class and one process family, `HELD_OUT`) are reported separately.

    python experiments/benchmarks/sampler_selection.py [--name sampler_suite]

reads experiments/results/<name>.json and writes <name>.md (tables) and <name>.png (error vs NFE).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import math
import os

import numpy as np

from experiments.benchmarks.common import RESULTS_DIR, markdown_table

SELECTION_NFES = (5, 10, 20)
ERROR_FLOOR = 1e-3  # the absolute minimum of every entry's error floor
# Held out of the choice: one problem per class (under every process) and one process family.
HELD_OUT_PROBLEMS = ("fashion_mnist", "gauss256_p0.5", "mix16_sep20_aniso100")
HELD_OUT_PROCESSES = ("cosine",)


def is_held_out(entry: str) -> bool:
    problem, process = entry.split("/")
    return process in HELD_OUT_PROCESSES or any(problem.startswith(p) for p in HELD_OUT_PROBLEMS)


def entry_class(row) -> str:
    """Problem class, with the non-DDPM processes as their own class ("process sweep"); trained networks
    are one class under every process."""
    return row["kind"] if row["process"] == "ddpm" or row["kind"] == "trained" else f"sweep:{row['process']}"


def error_table(rows):
    """{(entry, nfe): {method: error}} and the class of each entry."""
    table = collections.defaultdict(dict)
    classes = {}
    for r in rows:
        err = r["error"] if math.isfinite(r["error"]) else float("inf")
        table[(r["entry"], r["nfe"])][r["method"]] = err
        classes[r["entry"]] = entry_class(r)
    return table, classes


def error_floors(references) -> dict:
    """{entry: floor}: max(the reference's N vs 2N-step gap, ERROR_FLOOR, and on image sets the error of one
    sample at another training image, `one_sample_error`)."""
    return {
        r["entry"]: max(float(r["reference_gap"]), ERROR_FLOOR, float(r.get("one_sample_error", 0.0)))
        for r in references
    }


def ratio(error: float, best: float, floor: float) -> float:
    """error / best with both raised to the floor (errors below it are ties)."""
    return max(error, floor) / max(best, floor)


def best_of(errors: dict, keep) -> tuple[str, float]:
    chosen = {m: e for m, e in errors.items() if keep(m)}
    if not chosen:
        return "", float("nan")
    m = min(chosen, key=chosen.get)
    return m, chosen[m]


def is_peer(method: str) -> bool:
    return method.startswith("diffusers ")


def worst_ratios(table, methods, entries, floors, nfes=SELECTION_NFES, best_among=None):
    """{method: (worst ratio, (entry, nfe) where)} over the given entries and NFEs; the best is over every
    method, or over those `best_among(method)` keeps (e.g. the diffusers settings), floored per entry."""
    out = {}
    for m in methods:
        worst, where = 0.0, None
        for entry in entries:
            for nfe in nfes:
                errors = table.get((entry, nfe))
                if not errors or m not in errors:
                    continue
                _, best = best_of(errors, best_among or (lambda _: True))
                if not math.isfinite(best):
                    continue
                r = ratio(errors[m], best, floors[entry])
                if r > worst:
                    worst, where = r, (entry, nfe)
        out[m] = (worst, where)
    return out


TIE = 1.05  # worst ratios within 5 % of each other are ties, broken by the next-worst ratio (leximax)


def sorted_ratios(table, method, entries, floors, nfes=SELECTION_NFES) -> list[float]:
    """The method's floored ratios to the best method over the entries and NFEs, largest first."""
    ratios = [
        ratio(errors[method], min(errors.values()), floors[e])
        for e in entries
        for n in nfes
        if method in (errors := table.get((e, n), {}))
    ]
    return sorted(ratios, reverse=True)


def compare_leximax(a: list[float], b: list[float]) -> int:
    """-1 if ratio list a (largest first) is better than b: the first pair that differs by more than TIE
    decides; 0 if none does."""
    for x, y in zip(a, b):
        if x > TIE * y:
            return 1
        if y > TIE * x:
            return -1
    return 0


def leximax_order(vectors: dict) -> list:
    """The keys of {candidate: ratios, largest first} best first by `compare_leximax` (ties keep their order)."""
    return sorted(vectors, key=functools.cmp_to_key(lambda a, b: compare_leximax(vectors[a], vectors[b])))


def selection_entries(classes) -> list[str]:
    """The entries the choice is made on: all but the held-out ones."""
    return sorted(e for e in classes if not is_held_out(e))


def minimax(table, classes, candidates, floors):
    """The candidate with the smallest worst ratio on the selection entries (ties within TIE broken by the
    next-worst ratio, and so on), and all scores."""
    selection = selection_entries(classes)
    held_out = sorted(e for e in classes if is_held_out(e))
    on_selection = worst_ratios(table, candidates, selection, floors)
    on_held_out = worst_ratios(table, candidates, held_out, floors)
    on_all = worst_ratios(table, candidates, sorted(classes), floors)
    ranked = leximax_order({m: sorted_ratios(table, m, selection, floors) for m in candidates})
    return ranked, on_selection, on_held_out, on_all, selection, held_out


def nfe_winner(table, candidates, entries, floors, nfe: int) -> str | None:
    """The candidate that `minimax`'s rule picks from one NFE's ratios alone (None if none ran at it)."""
    vectors = {m: sorted_ratios(table, m, entries, floors, nfes=(nfe,)) for m in candidates}
    ranked = leximax_order({m: v for m, v in vectors.items() if v})
    return ranked[0] if ranked else None


@dataclasses.dataclass(frozen=True)
class Switched:
    """`few` up to `last_few_nfe` network calls, `many` beyond: a default that depends on the NFE."""

    few: str
    many: str
    last_few_nfe: int

    @property
    def label(self) -> str:
        return f"{self.few} up to {self.last_few_nfe} NFE, else {self.many}"

    def at(self, nfe: int) -> str:
        return self.few if nfe <= self.last_few_nfe else self.many


def switched_candidate(table, candidates, entries, floors, measured_nfes) -> Switched | None:
    """When the setting `minimax`'s rule picks at each selection NFE alone changes once (A at the lower
    NFEs, B from some NFE on): A up to the switch, B beyond. The switch is the last NFE measured (between A's
    last winning selection NFE and B's first) before the first at which B's ratios beat A's (leximax, ties
    within TIE keep A). None when one setting wins every selection NFE, the winners change more than once, or
    a selection NFE was not run."""
    winners = [nfe_winner(table, candidates, entries, floors, n) for n in SELECTION_NFES]
    if None in winners:
        return None
    changes = [i for i in range(1, len(winners)) if winners[i] != winners[i - 1]]
    if len(changes) != 1:
        return None
    few, many = winners[changes[0] - 1], winners[changes[0]]
    last_few = SELECTION_NFES[changes[0] - 1]
    for nfe in sorted(n for n in measured_nfes if last_few < n < SELECTION_NFES[changes[0]]):
        a, b = (sorted_ratios(table, m, entries, floors, nfes=(nfe,)) for m in (few, many))
        if compare_leximax(b, a) < 0:
            break
        last_few = nfe
    return Switched(few, many, last_few)


def with_switched_default(payload) -> tuple[dict, Switched | None]:
    """(payload, switch): the payload with the switched candidate's rows added (copies of its settings' rows
    under its label) when there is one, so that it is ranked, tabulated and plotted like any setting."""
    measured = [r for r in payload["rows"] if not r.get("switched")]  # (a payload passed through here before)
    table, classes = error_table(measured)
    floors = error_floors(payload["references"])
    ours = sorted({r["method"] for r in measured if r["library"] == "diffjax"})
    switch = switched_candidate(table, ours, selection_entries(classes), floors, payload["nfes"])
    if switch is None:
        return {**payload, "rows": measured}, None
    added = [{**r, "method": switch.label, "switched": True} for r in measured
             if r["library"] == "diffjax" and r["method"] == switch.at(r["nfe"])]  # fmt: skip
    return {**payload, "rows": measured + added}, switch


def geomean(values):
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return float(np.exp(np.mean(np.log(values)))) if values else float("nan")


def _fmt(x, digits=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}"


def class_summary(table, classes, method, nfes, floors):
    """Per class and NFE: geometric mean over the class's entries of the method's error, of the best of
    ours and of the best diffusers setting (per entry), and the method's worst (floored) ratio to the best
    method and to the best diffusers setting. NFEs the class's entries were not run at are left out."""
    out = {}
    for cls in sorted(set(classes.values())):
        entries = [e for e, c in classes.items() if c == cls]
        for nfe in nfes:
            if not any((e, nfe) in table for e in entries):
                continue  # e.g. trained networks run at the selection's NFEs only
            mine, ours, peers, r_peer, r_all = [], [], [], [], []
            for e in entries:
                errors = table.get((e, nfe), {})
                if method not in errors:
                    continue
                _, bo = best_of(errors, lambda m: not is_peer(m))
                _, bp = best_of(errors, is_peer)
                mine.append(errors[method])
                ours.append(bo)
                r_all.append(ratio(errors[method], min(errors.values()), floors[e]))
                if math.isfinite(bp):
                    peers.append(bp)
                    r_peer.append(ratio(errors[method], bp, floors[e]))
            out[(cls, nfe)] = {
                "method": geomean(mine),
                "best_ours": geomean(ours),
                "best_diffusers": geomean(peers) if peers else float("nan"),
                "worst_ratio_to_best": max(r_all) if r_all else float("nan"),
                "worst_ratio_to_diffusers": max(r_peer) if r_peer else float("nan"),
            }
    return out


# ------------------------------------------------------------------------------------------------
# A log-log plot with Pillow (no matplotlib needed)
# ------------------------------------------------------------------------------------------------

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (127, 127, 127)]


def plot_panels(panels, path, title):
    """panels: [(panel title, {label: [(nfe, error)]})]; a grid of log-log panels as a PNG."""
    from PIL import Image, ImageDraw  # noqa: PLC0415 (Pillow is a dependency; only the plot needs it)

    cols = 3
    rows = -(-len(panels) // cols)
    pw, ph, margin = 420, 320, 55
    image = Image.new("RGB", (cols * pw, rows * ph + 40 + 18 * 6), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill="black")
    labels = []
    for i, (name, series) in enumerate(panels):
        ox, oy = (i % cols) * pw, 40 + (i // cols) * ph
        values = [e for pts in series.values() for _, e in pts if e > 0 and math.isfinite(e)]
        if not values:
            continue
        lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
        hi = max(hi, lo + 1)
        x0, x1, y0, y1 = ox + margin, ox + pw - 15, oy + ph - 40, oy + 25
        xmin, xmax = math.log(3), math.log(50)

        def xy(nfe, err, x0=x0, x1=x1, y0=y0, y1=y1, lo=lo, hi=hi, xmin=xmin, xmax=xmax):
            fx = (math.log(nfe) - xmin) / (xmax - xmin)
            fy = (math.log10(err) - lo) / (hi - lo)
            return x0 + fx * (x1 - x0), y0 + fy * (y1 - y0)

        draw.rectangle([x0, y1, x1, y0], outline="black")
        draw.text((x0, oy + 5), name, fill="black")
        for k in range(lo, hi + 1):
            _, y = xy(3, 10.0**k)
            draw.line([x0, y, x1, y], fill=(225, 225, 225))
            draw.text((ox + 8, y - 6), f"1e{k}", fill="black")
        for nfe in (3, 5, 10, 20, 50):
            x, _ = xy(nfe, 10.0**lo)
            draw.line([x, y0, x, y1], fill=(225, 225, 225))
            draw.text((x - 6, y0 + 5), str(nfe), fill="black")
        draw.text((x1 - 60, y0 + 20), "NFE", fill="black")
        for j, (label, pts) in enumerate(series.items()):
            color = COLORS[j % len(COLORS)]
            pts = [xy(n, e) for n, e in sorted(pts) if e > 0 and math.isfinite(e)]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=2)
            for x, y in pts:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            if label not in labels:
                labels.append(label)
    for j, label in enumerate(labels):
        y = 40 + rows * ph + 4 + 18 * j
        draw.rectangle([10, y + 3, 30, y + 9], fill=COLORS[j % len(COLORS)])
        draw.text((38, y), label, fill="black")
    tmp = path + ".tmp.png"
    image.save(tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------


def minimax_class_table(table, classes, methods, floors, nfes=SELECTION_NFES):
    """Per method and class: the worst ratio to the best method / to the best diffusers setting at each NFE."""
    head = ["setting", "class"] + [f"NFE {n}: ÷best, ÷best diffusers" for n in nfes]
    body = []
    for m in methods:
        summary = class_summary(table, classes, m, nfes, floors)
        for cls in sorted(set(classes.values())):
            cells = [m, cls]
            for nfe in nfes:
                s = summary[(cls, nfe)]
                cells.append(f"{_fmt(s['worst_ratio_to_best'], 2)}, {_fmt(s['worst_ratio_to_diffusers'], 2)}")
            body.append(cells)
    return markdown_table(head, body)


CLASS_TITLES = {
    "gaussian": "Gaussians",
    "images": "images",
    "mixture": "mixtures",
    "sweep": "VP, cosine, EDM, flow",
    "trained": "trained networks (DDPM, EDM)",
}


def compact_summary(payload, winner, nfes=SELECTION_NFES) -> str:
    """The README's table: per class (the four non-DDPM processes together) geometric-mean errors of the
    chosen default, the former default, the best of ours and the best diffusers setting, and the default's
    worst ratios, NFEs side by side."""
    table, classes = error_table(payload["rows"])
    floors = error_floors(payload["references"])
    merged = {e: ("sweep" if c.startswith("sweep:") else c) for e, c in classes.items()}
    new = class_summary(table, merged, winner, nfes, floors)
    old = class_summary(table, merged, payload["previous_default"], nfes, floors)
    head = ["class", "NFE", "default", "former default", "best of ours", "best diffusers", "default ÷ best",
            "default ÷ best diffusers"]  # fmt: skip
    body = []
    for cls, title in CLASS_TITLES.items():
        count = len({e for e, c in merged.items() if c == cls})
        if not count:
            continue

        def cells(summary, key, digits):
            return " / ".join(_fmt(summary[(cls, n)][key], digits) for n in nfes)

        body.append([f"{title} ({count})", " / ".join(map(str, nfes)), cells(new, "method", 2), cells(old, "method", 2),
                     cells(new, "best_ours", 2), cells(new, "best_diffusers", 2), cells(new, "worst_ratio_to_best", 2),
                     cells(new, "worst_ratio_to_diffusers", 2)])  # fmt: skip
    return markdown_table(head, body)


def selection(payload):
    """(winner, runner-ups, scores...) of the payload's diffjax settings (with `with_switched_default`'s
    payload: and the switched candidate); see `minimax`."""
    rows = payload["rows"]
    table, classes = error_table(rows)
    floors = error_floors(payload["references"])
    ours = sorted({r["method"] for r in rows if r["library"] == "diffjax"})
    return table, classes, floors, ours, minimax(table, classes, ours, floors)  # (ranked, ...): ranked[0] wins


def write_report(payload, name="sampler_suite"):
    payload, switch = with_switched_default(payload)
    rows = payload["rows"]
    nfes = payload["nfes"]
    current = payload["previous_default"]
    table, classes, floors, ours, (ranked, on_sel, on_held, on_all, selected, held_out) = selection(payload)
    winner = ranked[0]
    settings = [m for m in ours if switch is None or m != switch.label]  # those measured
    peers = sorted({r["method"] for r in rows if r["library"] == "diffusers"})
    ddpm_entries = [e for e in classes if e.endswith("/ddpm")]
    peer_scores = worst_ratios(table, peers, ddpm_entries, floors)
    best_peer = min(peers, key=lambda m: peer_scores[m][0]) if peers else None
    to_peers = worst_ratios(table, ours, ddpm_entries, floors, best_among=is_peer)

    lines = [f"# Sampler suite ({'full' if payload['full'] else 'default'} size)", ""]
    env = payload.get("environment", {})
    cpu = payload.get("cpu_seconds")
    lines += [
        f"{env.get('date', '')}, {env.get('device', '')}, jax {env.get('versions', {}).get('jax', '')}, "
        f"diffusers {payload.get('peer_versions', {}).get('diffusers') or '-'}; "
        f"{len(classes)} entries (problem/process), {len(settings)} of our settings, {len(peers)} diffusers settings; "
        f"suite wall time {payload['seconds'] / 60:.1f} min"
        + (f", CPU time {cpu / 60:.1f} min" if cpu else "")
        + " (shared 2-core machine). "
        "Error: RMS(x - x_ref)/RMS(x_ref - mean x_ref) from the same noise, x_ref the exact probability-flow "
        f"solution (closed form for Gaussians; else {payload['reference_method']} at "
        f"{payload['reference_steps'][1]} steps). NFE counts every network call. Ratios (÷best) use each "
        f"entry's error floor (column 'floor' below): max(reference gap between its N- and 2N-step solves, "
        f"{ERROR_FLOOR:g}, and on image sets the error one sample at another training image causes); errors "
        "below it count as ties.",
        "",
        "## Summary per problem class and NFE (geometric mean of the error over the class's problems)",
        "",
        f"Chosen default (minimax on the selection entries, ties within {TIE - 1:.0%} broken by the next-worst "
        f"ratio): **{winner}**; previous default: {current}.",
        "",
    ]
    if switch is not None:
        picks = ", ".join(f"{nfe_winner(table, settings, selected, floors, n)} at {n}" for n in SELECTION_NFES)
        lines += [
            f"The same rule applied to each NFE alone picks {picks}; the two cross between the measured NFEs "
            f"{switch.last_few_nfe} and {min(n for n in nfes if n > switch.last_few_nfe)} (the last NFE at which "
            f"the first is not beaten by the second), so a default that switches there is a candidate too "
            f"(`{switch.label}`).",
            "",
        ]
    lines += ["Compact (NFE 5 / 10 / 20; the four non-DDPM processes together; entry counts in brackets):", "",
              compact_summary(payload, winner), "", "Per class and NFE:", ""]  # fmt: skip
    summary_new = class_summary(table, classes, winner, nfes, floors)
    summary_old = class_summary(table, classes, current, nfes, floors)
    head = ["class", "NFE", "chosen default", "previous default", "best of ours", "best diffusers",
            "chosen ÷ best (worst)", "chosen ÷ best diffusers (worst)"]  # fmt: skip
    body = []
    for (cls, nfe), s in sorted(summary_new.items()):
        o = summary_old[(cls, nfe)]
        body.append([cls, nfe, _fmt(s["method"]), _fmt(o["method"]), _fmt(s["best_ours"]), _fmt(s["best_diffusers"]),
                     _fmt(s["worst_ratio_to_best"]), _fmt(s["worst_ratio_to_diffusers"])])  # fmt: skip
    lines += [markdown_table(head, body), ""]

    lines += ["## Minimax: worst ratio to the best method per entry at NFE 5, 10, 20", ""]
    lines += [
        f"Selection entries ({len(selected)}): all but the held-out problems {list(HELD_OUT_PROBLEMS)} and the "
        f"{list(HELD_OUT_PROCESSES)} process ({len(held_out)} entries). The best per entry is over every method, "
        'diffusers\' included; "÷ best diffusers" is over the DDPM-chain entries, where diffusers runs.',
        "",
    ]
    head = ["our setting", "worst ÷best (selection)", "where", "worst ÷best (held out)", "where", "worst ÷best (all)",
            "worst ÷best diffusers (DDPM)", "where"]  # fmt: skip
    body = [[m, _fmt(on_sel[m][0]), f"{on_sel[m][1]}", _fmt(on_held[m][0]), f"{on_held[m][1]}", _fmt(on_all[m][0]),
             _fmt(to_peers[m][0]), f"{to_peers[m][1]}"]
            for m in ranked[:20]]  # fmt: skip
    if current in on_sel and current not in ranked[:20]:
        body += [[f"{current} (previous default)", _fmt(on_sel[current][0]), f"{on_sel[current][1]}",
                  _fmt(on_held[current][0]), f"{on_held[current][1]}", _fmt(on_all[current][0]),
                  _fmt(to_peers[current][0]), f"{to_peers[current][1]}"]]  # fmt: skip
    lines += [markdown_table(head, body), ""]
    plain = {
        e: max(float(r["reference_gap"]), ERROR_FLOOR) for e, r in ((r["entry"], r) for r in payload["references"])
    }
    plain_ranked, plain_sel, *_ = minimax(table, classes, ours, plain)
    same = plain_ranked[0] == winner
    lines += [
        f"Sensitivity: with the floor max(reference gap, {ERROR_FLOOR:g}) alone (no image resolution floor) the "
        + (
            f"same rule picks the same setting (worst ratio {_fmt(plain_sel[winner][0])} on the selection)."
            if same
            else f"same rule picks {plain_ranked[0]} (worst ratio {_fmt(plain_sel[plain_ranked[0]][0])} on the "
            f"selection, {_fmt(plain_sel[winner][0])} for {winner}): entries where some method puts every image "
            "sample on the reference's training image (error ~1e-7) decide that choice."
        ),
        "",
    ]
    shown = list(dict.fromkeys(ranked[:3] + ([current] if current in on_sel else [])))
    lines += ["Per class (worst over the class's entries) for the chosen default, the runner-ups and the previous "
              "default:", "", minimax_class_table(table, classes, shown, floors), ""]  # fmt: skip
    if peers:
        lines += ["diffusers settings on the DDPM-chain entries (same ratios):", ""]
        ranked_p = sorted(peers, key=lambda m: peer_scores[m][0])
        peer_rows = [[m, _fmt(peer_scores[m][0]), f"{peer_scores[m][1]}"] for m in ranked_p]
        lines += [markdown_table(["diffusers setting", "worst ratio", "where"], peer_rows), ""]
        lines += [f"Best diffusers setting by the same minimax: **{best_peer}**.", ""]

    # per-NFE ratios of the chosen default against the best diffusers setting and the best method
    lines += ["## The chosen default per entry and NFE", ""]
    head = ["entry", "held out", "floor"] + [f"NFE {n}: err (÷best, ÷best diffusers)" for n in nfes]
    body = []
    for entry in sorted(classes):
        cells = [entry, "yes" if is_held_out(entry) else "", _fmt(floors[entry], 2)]
        for nfe in nfes:
            errors = table.get((entry, nfe), {})
            if winner not in errors:
                cells.append("-")
                continue
            e = errors[winner]
            _, bp = best_of(errors, is_peer)
            to_peer = _fmt(ratio(e, bp, floors[entry]), 2) if math.isfinite(bp) else "-"
            cells.append(f"{_fmt(e)} ({_fmt(ratio(e, min(errors.values()), floors[entry]), 2)}, {to_peer})")
        body.append(cells)
    lines += [markdown_table(head, body), ""]

    lines += class_metric_tables(rows, payload, winner, current, best_peer)
    lines += reference_table(payload)

    path = os.path.join(RESULTS_DIR, f"{name}.md")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    os.replace(tmp, path)
    write_plot(table, classes, winner, current, best_peer, nfes, os.path.join(RESULTS_DIR, f"{name}.png"))
    print("\n".join(lines[:60]))
    return winner


def class_metric_tables(rows, payload, winner, current, best_peer):
    """Decile log-variance errors (Gaussians), nearest-image agreement (images), weight/std errors (mixtures)
    for the chosen default, the previous default and the best diffusers setting, on the DDPM entries."""
    by = {(r["entry"], r["method"], r["nfe"]): r for r in rows}
    refs = {r["entry"]: r for r in payload["references"]}
    shown = [m for m in (winner, current, best_peer) if m]
    out = ["## Per-class measures (DDPM chain)", ""]
    body = []
    for entry, ref in sorted(refs.items()):
        if not entry.endswith("/ddpm") or ref["kind"] != "gaussian":
            continue
        body.append([entry, "exact reference", 0, " ".join(f"{v:+.2f}" for v in ref["decile_log_var"])])
        for m in shown:
            for nfe in SELECTION_NFES:
                r = by.get((entry, m, nfe))
                if r:
                    body.append([entry, m, nfe, " ".join(f"{v:+.2f}" for v in r["decile_log_var"])])
    out += ["Gaussians: log(var_hat/var) per decile of the spectrum (largest first), against the data:", ""]
    out += [markdown_table(["entry", "method", "NFE", "deciles 1..10"], body), ""]
    body = []
    for entry, ref in sorted(refs.items()):
        if not entry.endswith("/ddpm") or ref["kind"] != "images":
            continue
        for m in shown:
            body.append([entry, m] + [_fmt(by[(entry, m, n)].get("nn_agreement")) if (entry, m, n) in by else "-"
                                      for n in payload["nfes"]])  # fmt: skip
    out += ["Images: fraction of samples whose nearest training image is the reference's:", ""]
    out += [markdown_table(["entry", "method"] + [f"NFE {n}" for n in payload["nfes"]], body), ""]
    body = []
    for entry, ref in sorted(refs.items()):
        if ref["kind"] != "mixture":
            continue
        body.append([entry, "exact reference", "-", _fmt(ref["weight_error"]), _fmt(ref["std_error"])])
        for m in shown:
            for nfe in SELECTION_NFES:
                r = by.get((entry, m, nfe))
                if r:
                    body.append([entry, m, nfe, _fmt(r["weight_error"]), _fmt(r["std_error"])])
    out += ["Mixtures: weight error sum|w_hat - w| and worst per-(component, dimension) std error |s_hat/s - 1| "
            "(the exact reference's row is the sampling floor):", ""]  # fmt: skip
    out += [markdown_table(["entry", "method", "NFE", "weight error", "std error"], body), ""]
    return out


def reference_table(payload):
    out = [
        "## References",
        "",
        "Gap: relative difference between the reference solves at N and 2N steps (0: closed form).",
        "",
    ]
    body = [[r["entry"], r["dim"], r["batch"], _fmt(r["reference_gap"])] for r in payload["references"]]
    return out + [markdown_table(["entry", "dim", "samples", "gap"], body), ""]


def write_plot(table, classes, winner, current, best_peer, nfes, path):
    panels = []
    for cls in sorted(set(classes.values())):
        entries = [e for e, c in classes.items() if c == cls]
        series = {}
        for label, keep in (
            (f"chosen: {winner}", lambda m: m == winner),
            (f"previous: {current}", lambda m: m == current),
            ("best of ours (per point)", lambda m: not is_peer(m)),
            ("best diffusers (per point)", is_peer),
        ):
            pts = []
            for nfe in nfes:
                errs = [best_of(table.get((e, nfe), {}), keep)[1] for e in entries]
                errs = [e for e in errs if math.isfinite(e)]
                if errs:
                    pts.append((nfe, geomean(errs)))
            if pts:
                series[label] = pts
        if best_peer:
            pts = [
                (nfe, geomean([table.get((e, nfe), {}).get(best_peer, float("nan")) for e in entries])) for nfe in nfes
            ]
            series[f"{best_peer}"] = [p for p in pts if math.isfinite(p[1])]
        panels.append((f"{cls} ({len(entries)} problems): geomean error", series))
    plot_panels(panels, path, "Sampler suite: relative error vs NFE (log-log), same noise, exact references")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="sampler_suite")
    args = parser.parse_args(argv)
    with open(os.path.join(RESULTS_DIR, f"{args.name}.json")) as f:
        payload = json.load(f)
    write_report(payload, args.name)


if __name__ == "__main__":
    main()

"""What a fit says, in words: `summary` (the text every command prints) and `render` (report.md, with the figures)."""

from __future__ import annotations

import math
import os

from scalax.scaling.analysis import APPROACH_NAMES, MIN_PARABOLA_POINTS
from scalax.scaling.results import Approach1, Approach2, Checked, DataConstrainedLaw, FitResult, NoPrediction, PowerLaw
from scalax.scaling.sweep import branch_cost_line, branch_costs


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.4g}"


def _ci(approach: Checked, key: str) -> str:
    ci = approach.interval(key)
    return f"[{_fmt(ci.low)}, {_fmt(ci.high)}]" if ci else ""


def _r2(law) -> str:
    return f"R² {law.r2:.4f}" if law.r2 is not None and math.isfinite(law.r2) else "R² n/a"


def _exponents(approach: Approach1 | Approach2, n_label: str, d_label: str) -> str:
    parts = []
    for key, label in (("a", n_label), ("b", d_label)):
        law: PowerLaw = getattr(approach, key)
        parts.append(f"{label} ∝ C^{law.exponent:.4f} {_ci(approach, key)} ({_r2(law)})".replace("  ", " "))
    return "; ".join(parts)


def intervals_line(result: FitResult) -> str:
    s = result.settings
    if not s.bootstrap:
        return "no intervals (bootstrap 0)"
    return (f"intervals: {s.level:.0%} percentile bootstrap over {s.resampled}, {s.bootstrap} resamples, "
            f"seed {s.seed}")


def summary(result: FitResult, warnings: bool = True) -> str:
    """Every approach with its intervals, the held-out prediction and (unless `warnings` is False: report.md
    lists them in a section of their own) the warnings: what `scalax fit` and `scalax sweep` print."""
    conv = result.conventions
    lines = [f"{result.n_runs} runs; N = {conv.params}, C = {conv.flops} (grouped by {conv.grouping}); "
             f"{intervals_line(result)}"]
    flag = {name: "" if a.ok else "  [flagged: see the warnings]" for name, a in result.approaches().items()}
    if a1 := result.approach1:
        lines.append(f"{APPROACH_NAMES['approach1']}: {_exponents(a1, 'N_opt', 'D_opt')}{flag['approach1']}")
    if a2 := result.approach2:
        used = f"{len(a2.budgets)} of {len(a2.budgets) + len(a2.dropped)} budgets"
        body = _exponents(a2, "N*", "D*") if a2.a is not None else "no exponent"
        lines.append(f"{APPROACH_NAMES['approach2']}, {used}: {body}{flag['approach2']}")
    if p := result.approach3:
        lines.append(f"{APPROACH_NAMES['approach3']}: L(N, D) = {_fmt(p.E)} + {_fmt(p.A)}/N^{_fmt(p.alpha)} "
                     f"+ {_fmt(p.B)}/D^{_fmt(p.beta)}{flag['approach3']}")
        lines.append("  " + "; ".join(f"{k} {_fmt(getattr(p, k))} {_ci(p, k)}".rstrip()
                                      for k in ("E", "A", "B", "alpha", "beta")))
        lines.append(f"  N_opt ∝ C^{_fmt(p.a)} {_ci(p, 'a')}; D_opt ∝ C^{_fmt(p.b)} {_ci(p, 'b')}".replace(
            "  ;", ";"))
        if v := p.vpnls:
            lines.append(f"  cross-check by VPNLS (least squares, relative residuals): E {_fmt(v.E)}, "
                         f"alpha {_fmt(v.alpha)}, beta {_fmt(v.beta)}; Huber objective {v.objective:.6g} "
                         f"(L-BFGS: {p.objective:.6g})")
    if k := result.kaplan:
        parts = []
        if k.L_N:
            parts.append(f"L(N) = (N_c/N)^alpha_N: alpha_N {_fmt(k.L_N.alpha_N)}, N_c {_fmt(k.L_N.N_c)} "
                         f"({_r2(k.L_N)})")
        if k.L_C:
            parts.append(f"L(C) = (C_c/C)^alpha_C: alpha_C {_fmt(k.L_C.alpha_C)}, C_c {_fmt(k.L_C.C_c)} "
                         f"({_r2(k.L_C)})")
        lines.append(f"{APPROACH_NAMES['kaplan']}: {'; '.join(parts) or 'too few sizes and budgets'}{flag['kaplan']}")
    if dc := result.data_constrained:
        lines += _data_constrained_lines(dc, flag["data_constrained"])
    pred = result.prediction
    if isinstance(pred, NoPrediction):
        lines.append(f"prediction at the largest budget: not made: {pred.reason}")
    elif pred:
        lines.append(f"prediction at the largest budget: approach 3 fitted on the {pred.fitted_on_budgets} smaller "
                     f"budgets predicts {pred.predicted_best_loss:.4f} at C = {_fmt(pred.flops)}; the best run "
                     f"there reached {pred.observed_best_loss:.4f} ({pred.relative_error:+.2%})")
    if warnings:
        lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


def _data_constrained_lines(p: DataConstrainedLaw, flag: str) -> list[str]:
    return [f"{APPROACH_NAMES['data_constrained']}: L(N, D, U) = {_fmt(p.E)} + {_fmt(p.A)}/N'^{_fmt(p.alpha)} "
            f"+ {_fmt(p.B)}/D'^{_fmt(p.beta)}; {p.single_epoch_runs} runs of one epoch, {p.repeated_runs} "
            f"repeating{flag}",
            "  " + "; ".join(f"{k} {_fmt(getattr(p, k))} {_ci(p, k)}".rstrip()
                             for k in ("E", "A", "B", "alpha", "beta", "R_D_star", "R_N_star")),
            f"  D' = U + U·R_D*·(1 - exp(-R_D/R_D*)), R_D = D/U - 1; N' likewise over U_N = min(N_opt(U), N); "
            f"Huber objective {p.objective:.6g}"]


def render(result: FitResult, records: list[dict], plot_paths: list[str], workdir: str) -> str:
    """report.md: the summary and warnings, a table per approach, the figures, the runs."""
    conv = result.conventions
    trunks = sum(r.get("role") == "trunk" for r in records)  # wsd_branch trunks: trained, not points of the fits
    lines = ["# Sweep report", "",
             f"{result.n_runs} finished runs of {len(records) - trunks}" + (f" (and {trunks} trunks)" if trunks else "")
             + f"; N = `{conv.params}`, C = `{conv.flops}`, loss = {conv.loss}; {intervals_line(result)}.", ""]
    failed = [r for r in records if r.get("status") != "finished"]
    if failed:
        lines += ["Not finished: " + ", ".join(f"{r['name']} ({r.get('status')}: {r.get('error')})" for r in failed),
                  ""]
    if result.warnings:
        lines += ["## Warnings", "", "These approaches are flagged: read their numbers as diagnostics, not results; "
                  "the figures draw no fitted line for them.", ""]
        lines += [f"- {w}" for w in result.warnings]
        lines.append("")
    lines += ["## Summary", "", "```", summary(result, warnings=False), "```", ""]
    lines += _branch_cost_section(records, conv.flops)
    lines += _approach_sections(result)
    lines += ["## Figures", ""]
    lines += [f"![{os.path.basename(p)}]({os.path.relpath(p, workdir)})" for p in plot_paths]
    lines += ["", "## Runs", "", "| name | status | N | D | C | eval loss | bits/byte | wall s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['name']} | {r.get('status')} | {r.get(conv.params)} | {r.get('tokens')} | "
                     f"{_fmt(r.get(conv.flops))} | {_fmt(r.get('eval_loss'))} | {_fmt(r.get('eval_bpb'))} | "
                     f"{_fmt(r.get('wall_seconds'))} |")
    return "\n".join(lines) + "\n"


def _branch_cost_section(records: list[dict], flops_key: str) -> list[str]:
    """A wsd_branch sweep's compute: each trunk and its cooldowns against its branches trained independently,
    in units of its shortest branch's C (D for the token counts {1, 2, 4, 8} x D)."""
    costs = branch_costs(records, flops_key)
    if not costs:
        return []
    lines = ["## Compute of the branched runs", "", branch_cost_line(records, flops_key) + ".", "",
             "| trunk | branches | spent (x shortest branch) | independent runs (x shortest) | saved |",
             "|---|---|---|---|---|"]
    lines += [f"| {c['trunk']} | {c['branches']} | {c['spent'] / c['smallest']:.2f} | "
              f"{c['independent'] / c['smallest']:.2f} | {1 - c['spent'] / c['independent']:.0%} |" for c in costs]
    return [*lines, ""]


def _approach_sections(result: FitResult) -> list[str]:
    """A markdown section per approach, then the prediction at the largest budget."""
    lines = []
    if p := result.approach3:
        lines += ["## Approach 3: L(N, D) = E + A/N^alpha + B/D^beta", ""]
        lines += ["| parameter | value | interval |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(getattr(p, k))} | {_ci(p, k)} |" for k in ("E", "A", "B", "alpha", "beta", "a", "b")]
        if v := p.vpnls:
            lines += ["", "Cross-check by VPNLS (E, A, B by non-negative least squares at each alpha, beta; least "
                      f"squares of relative residuals): E {_fmt(v.E)}, A {_fmt(v.A)}, B {_fmt(v.B)}, "
                      f"alpha {_fmt(v.alpha)}, beta {_fmt(v.beta)}; Huber objective {v.objective:.6g} "
                      f"against L-BFGS's {p.objective:.6g}."]
        lines.append("")
    if a2 := result.approach2:
        lines += ["## Approach 2: IsoFLOP parabolas", "", "| budget C | N* | D* | loss at N* | R² of the parabola |",
                  "|---|---|---|---|---|"]
        lines += [f"| {_fmt(b.flops)} | {_fmt(b.n_star)} | {_fmt(b.d_star)} | {_fmt(b.loss_star)} | "
                  + (f"{b.r2:.4f} |" if b.points >= MIN_PARABOLA_POINTS else f"n/a ({b.points} sizes) |")
                  for b in a2.budgets]
        for d in a2.dropped:
            lines.append(f"| {_fmt(d.flops)} | dropped: {d.reason} | | | {_fmt(d.r2)} |")
        if a2.a is not None:
            lines += ["", f"N* ∝ C^{a2.a.exponent:.4f} {_ci(a2, 'a')} (R² of log N* against log C: "
                      f"{a2.a.r2:.4f}); D* ∝ C^{a2.b.exponent:.4f} {_ci(a2, 'b')}"]
        lines.append("")
    if a1 := result.approach1:
        lines += ["## Approach 1: the envelope", "", f"N_opt ∝ C^{a1.a.exponent:.4f} {_ci(a1, 'a')} "
                  f"(R² {a1.a.r2:.4f}); D_opt ∝ C^{a1.b.exponent:.4f} {_ci(a1, 'b')}", ""]
    if k := result.kaplan:
        lines += ["## Kaplan-style power laws", ""]
        if k.L_N:
            lines.append(f"- L(N) = (N_c / N)^alpha_N: alpha_N = {_fmt(k.L_N.alpha_N)}, "
                         f"N_c = {_fmt(k.L_N.N_c)}, R² {k.L_N.r2:.4f}")
        if k.L_C:
            lines.append(f"- L(C) = (C_c / C)^alpha_C: alpha_C = {_fmt(k.L_C.alpha_C)}, "
                         f"C_c = {_fmt(k.L_C.C_c)}, R² {k.L_C.r2:.4f}")
        lines.append("")
    pred = result.prediction
    if isinstance(pred, NoPrediction):
        lines += ["## Prediction at the largest budget", "", f"Not made: {pred.reason}.", ""]
    elif pred:
        lines += ["## Prediction at the largest budget", "",
                  f"Approach 3 fitted on the {pred.fitted_on_budgets} smaller budgets predicts a best loss of "
                  f"{pred.predicted_best_loss:.4f} at C = {_fmt(pred.flops)} (at N_opt = "
                  f"{_fmt(pred.n_opt)}); the best run there reached {pred.observed_best_loss:.4f}: error "
                  f"{pred.error:+.4f} ({pred.relative_error:+.2%}).", ""]
    return lines

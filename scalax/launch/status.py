"""`scalax launch status`: where a launched (or local) sweep stands, from its ledger and its runs' metrics on the
bucket: runs done, running, queued, failed, retried after a preemption; tokens done and the loss so far."""

from __future__ import annotations

import json

from scalax import io
from scalax.errors import ConfigError
from scalax.scaling import runner


def _progress(workdir: str, name: str) -> dict:
    """The newest training record of a run (step, tokens, loss) and how many times it resumed."""
    path = io.join(workdir, "runs", name, "metrics.jsonl")
    out = {"tokens_done": None, "loss": None, "resumes": 0}  # None: the run has logged nothing (yet)
    if not io.exists(path):
        return out
    for line in io.read_text(path, errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a record cut short by a kill
            continue
        if "resumed" in record:
            out["resumes"] += 1
        elif "loss" in record:
            out.update(tokens_done=record.get("tokens", 0), loss=record["loss"])
    return out


def status(workdir: str) -> dict:
    """{"runs": [per run: name, status, slice, tokens, tokens_done, loss, eval_loss, retries], "counts": ...}."""
    io.check_input(workdir, "--workdir")
    if not io.exists(io.join(workdir, "runs.jsonl")):
        raise ConfigError("--workdir", f"{workdir} holds no sweep (no runs.jsonl); allowed: the --workdir of a "
                          "`scalax launch` or `scalax sweep`")
    rows = []
    for r in runner.Ledger(workdir).records.values():
        progress = _progress(workdir, r["name"])
        rows.append({"name": r["name"], "status": r.get("status"), "slice": r.get("slice", ""),
                     "tokens": r.get("tokens"), "tokens_done": progress["tokens_done"], "loss": progress["loss"],
                     "eval_loss": r.get("eval_loss"),
                     "retries": max(r.get("preemptions", 0), progress["resumes"]), "error": r.get("error")})
    counts = {"finished": 0, "running": 0, "queued": 0, "failed": 0, "skipped": 0}
    for row in rows:
        key = {runner.PENDING: "queued", runner.DIVERGED: "failed"}.get(row["status"], row["status"])
        counts[key] = counts.get(key, 0) + 1
    counts["retried"] = sum(row["retries"] > 0 for row in rows)
    return {"workdir": workdir, "runs": rows, "counts": counts}


def format_status(report: dict) -> str:
    c = report["counts"]
    lines = [f"{report['workdir']}: {c['finished']} finished, {c['running']} running, {c['queued']} queued, "
             f"{c['failed']} failed, {c['skipped']} skipped; {c['retried']} retried after a preemption",
             f"{'run':<28} {'status':<9} {'slice':<14} {'tokens done':>22} {'loss':>7} {'eval':>7} {'retries':>7}"]
    for r in report["runs"]:
        done = "-" if r["tokens_done"] is None else f"{r['tokens_done']:,}"
        done += f"/{r['tokens']:,}" if r["tokens"] else ""
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        ev = f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-"
        lines.append(f"{r['name']:<28} {r['status']:<9} {r['slice']:<14} {done:>22} {loss:>7} {ev:>7} "
                     f"{r['retries']:>7}")
        if r["status"] in (runner.FAILED, runner.DIVERGED) and r["error"]:
            lines.append(f"    {r['error']}")
    return "\n".join(lines)

"""The tables of `python -m infer.spec_bench`, laid out like Spec-Bench's leaderboard."""

from __future__ import annotations

from jaxaccel.spec_bench import SUBTASKS

COLUMNS = (*SUBTASKS, "overall")


def _identical(value) -> str:
    return "" if value is None else ("yes" if value else "**no**")


def leaderboard(rows: list[dict]) -> list[str]:
    """Speedup (mean accepted tokens) per subtask and overall, one line per method; a subtask the
    run did not cover is left empty."""
    cell = {(r["method"], r["category"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| method | precision | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    for m in methods:
        precision = next(r["precision"] for r in rows if r["method"] == m)
        cells = [f"{cell[m, c]['speedup']:.2f}x ({cell[m, c]['mean_accepted_tokens']:.2f})" if (m, c) in cell else ""
                 for c in COLUMNS]
        lines.append(f"| {m} | {precision} | " + " | ".join(cells) + " |")
    return lines


def detail(rows: list[dict]) -> list[str]:
    """Every row: tokens/s, mean accepted tokens, speedup, identical to ar, questions, time in prefill."""
    lines = ["| method | category | questions | tokens/s | mean accepted tokens | speedup vs ar | identical to ar | "
             "prefill share |", "|---|---|---:|---:|---:|---:|:---:|---:|"]
    for r in rows:
        share = "" if r["prefill_seconds"] is None else f"{r['prefill_seconds'] / r['seconds']:.0%}"
        lines.append(f"| {r['method']} | {r['category']} | {r['num_questions']} | {r['tokens_per_s']:.1f} | "
                     f"{r['mean_accepted_tokens']:.2f} | {r['speedup']:.2f}x | {_identical(r['identical_to_ar'])} | "
                     f"{share} |")
    return lines


def markdown(report: dict) -> str:
    """Header, leaderboard table, per-category detail table, and what was skipped."""
    skipped = report["skipped_too_long"]
    prompts = "chat template" if report["chat"] else "plain text (no chat template)"
    lines = [f"model: {report['model']} ({report['num_params'] / 1e6:.2f}M params, {report['device']}), batch 1, "
             f"{report['num_questions']} Spec-Bench questions (first turn, {prompts}), "
             f"{report['max_new_tokens']} new tokens max, temperature {report['temperature']:g}",
             f"command: `{report['command']}`", "",
             "Speedup vs our ar in the same run (mean accepted tokens per forward pass):", "",
             *leaderboard(report["rows"]), "",
             "Per category (prefill share: of our decode time, the part spent prefilling the prompt):", "",
             *detail(report["rows"]), ""]
    if skipped["total"]:
        by = ", ".join(f"{c} {n}" for c, n in skipped["by_category"].items())
        lines.append(f"Skipped (prompt + max new tokens do not fit the context): {skipped['total']} ({by}).")
    else:
        lines.append("Skipped (too long for the context): none.")
    return "\n".join(lines) + "\n"

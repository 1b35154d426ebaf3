"""The distillation study's table (docs/study/llm/distill.md) from the runs ``distill.sh`` wrote.

For each size and fine-tuning: the LM-loss and the distilled runs' val/ppl and Hamlet word perplexity
(mean ± std [95 % t interval] over seeds), the paired per-seed difference distilled − LM loss, seconds a
step, the teacher's seconds a step and peak memory. Rows with fewer seeds than asked say their n.

    PYTHONPATH=. python docs/study/llm/distill_table.py [docs/study/llm/distill]   # from the repository root
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from src.utils.summary import estimate, fmt_estimate, paired

METRICS = {"val/ppl": "rt_review val/ppl", "eval/hamlet_128/word_perplexity": "Hamlet word ppl"}
COSTS = {"perf/step_time_s": "s/step", "perf/teacher_s": "teacher s/step", "perf/peak_mem_mb": "peak MB"}
SIZES = {"s1": "defaults (1152, 9.9 % removed)", "s2": "768 (19.7 % removed)"}


def load(root: Path) -> dict[tuple[str, str, str], dict[int, dict[str, float]]]:
    """(size, ft, loss) -> seed -> the completed run's metrics."""
    runs: dict[tuple[str, str, str], dict[int, dict[str, float]]] = {}
    for path in sorted(root.glob("*/*/results.json")):
        res = json.loads(path.read_text())
        if res.get("status") != "completed" or path.parent.name == "before":
            continue
        ft, loss, seed = path.parent.name.rsplit("-", 2)
        runs.setdefault((path.parent.parent.name, ft, loss), {})[int(seed[1:])] = res["metrics"]
    return runs


def before(root: Path) -> str:
    """Markdown: the uncompressed model and each size's compressed one before any step (n = 1 each)."""
    out = "| model, before any step | " + " | ".join(METRICS.values()) + " |\n|---|" + "---|" * len(METRICS) + "\n"
    for path in [root / "uncompressed/results.json", *sorted(root.glob("*/before/results.json"))]:
        if path.is_file() and (res := json.loads(path.read_text())).get("status") == "completed":
            name = "uncompressed (the teacher)" if path.parent.name == "uncompressed" else SIZES.get(path.parent.parent.name)
            out += f"| {name} | " + " | ".join(fmt_estimate(estimate([res["metrics"].get(k, float("nan"))])) for k in METRICS) + " |\n"
    return out


def table(runs: dict[tuple[str, str, str], dict[int, dict[str, float]]]) -> str:
    """Markdown: quality rows (both losses and their paired difference) then cost rows."""
    head = "| size | fine-tuning | metric | LM loss | logit distillation | distilled − LM loss (paired) |\n|---|---|---|---|---|---|\n"
    cost = "| size | fine-tuning | loss | n | " + " | ".join(COSTS.values()) + " |\n|---|---|---|---|" + "---|" * len(COSTS) + "\n"
    for (size, ft) in sorted({(s, f) for s, f, _ in runs}, key=lambda k: (k[0], k[1] != "lora")):
        lm, kl = runs.get((size, ft, "lm"), {}), runs.get((size, ft, "kl"), {})
        for key, name in METRICS.items():
            a = {s: m[key] for s, m in lm.items() if key in m}
            b = {s: m[key] for s, m in kl.items() if key in m}
            d = paired(b, a)
            diff = f"**{fmt_estimate(d)}**" if d.excludes_zero else fmt_estimate(d)
            head += (f"| {SIZES.get(size, size)} | {ft} | {name} | {fmt_estimate(estimate(list(a.values())))} (n = {len(a)}) "
                     f"| {fmt_estimate(estimate(list(b.values())))} (n = {len(b)}) | {diff} (n = {d.n}) |\n")
        for loss, group in (("LM loss", lm), ("logit distillation", kl)):
            cells = [fmt_estimate(estimate([m[k] for m in group.values() if k in m]), 3) for k in COSTS]
            cost += f"| {SIZES.get(size, size)} | {ft} | {loss} | {len(group)} | " + " | ".join(cells) + " |\n"
    return head + "\n" + cost


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/study/llm/distill")
    print(before(root) + "\n" + table(load(root)))

"""Markdown table of the SmolLM2 rt_review runs: python docs/study/smollm2/table.py docs/study/smollm2/runs

One row per run folder (its results.json and .hydra/config.yaml); these runs are one seed each, so
src.report (which pairs seeds) does not apply.
"""
import json
import sys
from pathlib import Path

rows = []
for d in sorted(Path(sys.argv[1]).iterdir()):
    f = d / "results.json"
    if not f.is_file():
        continue
    r = json.loads(f.read_text())
    if r["status"] != "completed":
        continue
    m, hp = r["metrics"], (d / ".hydra" / "config.yaml").read_text()
    refit = "lstsq" if "refit: lstsq" in hp else "none"
    weighting = "activation" if "weighting: activation" in hp else ""
    layers = r["layers"]
    lay = f"{layers[0]}-{layers[-1]}" if layers else "-"
    def g(k: str) -> str:
        return f"{m[k]:.3f}" if k in m else "-"

    rows.append((d.name, r["ffn_mode"], lay, r["mid_dim"] or "-", refit + (f", {weighting}" if weighting else ""),
                 f"{m.get('fusion/params_after', m.get('fusion/params_before', 0)) / 1e6:.1f}" if "fusion/params_after" in m else "134.5",
                 g("fusion/hidden_rel_err"), g("fusion/output_rel_err"), g("fusion/ntk_sign_rel_err"),
                 f"{m['val/ppl']:.1f}" if "val/ppl" in m else "-", f"{m.get('perf/peak_mem_mb', 0) / 1024:.1f}", f"{r.get('wall_time_s', 0):.0f}"))
print("| run | ffn_mode | layers | width | refit | params (M) | final hidden err | mean MLP out err | NTK sign err | val/ppl | peak RSS (GB) | wall (s) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for row in rows:
    print("| " + " | ".join(str(x) for x in row) + " |")

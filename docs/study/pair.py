"""Paired difference, seed by seed, of method A in one approx.json and method B in another (same seeds).

python docs/study/pair.py docs/study/approx_weight/approx.json ntk_cluster docs/study/approx_refit/approx.json ntk_cluster
"""

import json
import sys

import numpy as np
from scipy import stats


def per_seed(path: str, method: str) -> dict[int, dict[str, float]]:
    return {r["seed"]: r["metrics"] for r in json.load(open(path))["runs"] if r["method"] == method}


def main(path_a: str, method_a: str, path_b: str, method_b: str) -> None:
    a, b = per_seed(path_a, method_a), per_seed(path_b, method_b)
    seeds = sorted(set(a) & set(b))
    for key in ["hidden_rel_err", "output_rel_err", "ntk_sign_rel_err"]:
        d = np.array([a[s][key] - b[s][key] for s in seeds])
        lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d)) if len(d) > 1 else (np.nan, np.nan)
        print(f"{key}: n={len(d)} {method_a}={np.mean([a[s][key] for s in seeds]):.4f} {method_b}={np.mean([b[s][key] for s in seeds]):.4f} "
              f"difference {d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]")


if __name__ == "__main__":
    main(*sys.argv[1:5])

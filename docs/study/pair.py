"""Paired difference, seed by seed, of method A in one approx.json and method B in another (same seeds).

python docs/study/pair.py docs/study/approx_weight/approx.json ntk_cluster docs/study/approx_refit/approx.json ntk_cluster
"""

import json
import sys

from src.utils.summary import estimate, fmt_difference, fmt_estimate, paired


def per_seed(path: str, method: str, key: str) -> dict[int, float]:
    return {r["seed"]: r["metrics"][key] for r in json.load(open(path))["runs"] if r["method"] == method}


def main(path_a: str, method_a: str, path_b: str, method_b: str) -> None:
    for key in ["hidden_rel_err", "output_rel_err", "ntk_sign_rel_err"]:
        a, b = per_seed(path_a, method_a, key), per_seed(path_b, method_b, key)
        d = paired(a, b)
        print(f"{key}: n={d.n} {method_a}={fmt_estimate(estimate(list(a.values())))} {method_b}={fmt_estimate(estimate(list(b.values())))} "
              f"difference {fmt_difference(d, 4)}")


if __name__ == "__main__":
    main(*sys.argv[1:5])

"""Compare every compression method's approximation without training: ``python -m src.approx``.

For each method in ``methods`` it composes the training config with ``ffn_mode=<method>`` (plus
the command line's overrides, so layers, mid_dim and seed are shared), compresses a copy of the
original model and measures NTK and output errors on the same probe set. Writes ``approx.json``,
``approx.md`` and ``approx.png`` into the run folder and logs the table.
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

import src.utils.config  # noqa: F401  (registers the config resolvers)
from src.builders import build_data_and_module, preflight
from src.compress.cache import FusionCache
from src.metrics.approx import approximation_metrics
from src.models.build import model_identity
from src.models.fuse import compress_model, count_params
from src.utils.errors import ConfigError
from src.utils.io import atomic_path, write_json, write_text

log = logging.getLogger(__name__)

COLUMNS = [  # (key in a row, Markdown header)
    ("method", "method"), ("output_rel_err", "MLP output err (mean)"), ("logits_rel_err", "logits err"),
    ("ntk_sign_rel_err", "NTK sign err"), ("ntk_std_rel_err", "NTK std err"), ("ntk_probe_sign_rel_err", "probe-layer NTK sign err"),
    ("ntk_probe_std_rel_err", "probe-layer NTK std err"), ("params", "params"), ("compress_seconds", "compress s"),
]


def method_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """The full run config of each method, composed with the command line's overrides, validated."""
    user = [o for o in HydraConfig.get().overrides.task if not o.startswith(("methods=", "ffn_mode="))]
    known = sorted(p.stem for p in Path(__file__).resolve().parents[1].joinpath("conf", "ffn_mode").glob("[!_]*.yaml"))
    unknown = [m for m in cfg.methods if m not in known]
    if unknown:
        raise ConfigError(f"methods={list(cfg.methods)} has unknown method(s) {unknown}; allowed: {known}.")
    out = {}
    for m in cfg.methods:
        mc = compose("approx", overrides=[*user, f"ffn_mode={m}"])
        mc.paths = cfg.paths  # the hydra: resolvers only resolve in the running app's config
        out[m] = mc
    return out


def row(method: str, metrics: dict[str, float], params: int, seconds: float) -> dict[str, Any]:
    keys = ["output_rel_err", "logits_rel_err", "ntk_sign_rel_err", "ntk_std_rel_err", "ntk_probe_sign_rel_err", "ntk_probe_std_rel_err"]
    return {"method": method, **{k: metrics.get(f"fusion/{k}", 0.0) for k in keys}, "params": params, "compress_seconds": seconds}


def markdown(rows: list[dict[str, Any]]) -> str:
    fmt = lambda k, v: f"{v:,}" if k == "params" else f"{v:.2f}" if k == "compress_seconds" else f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(k, r[k]) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Grouped bars: MLP output error and both NTK errors per method (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in rows if r["method"] != "none"]
    keys = [("output_rel_err", "MLP output"), ("ntk_sign_rel_err", "NTK sign (Adam)"), ("ntk_std_rel_err", "NTK std (SGD)")]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    for j, (k, label) in enumerate(keys):
        ax.bar(x + (j - 1) * 0.27, [max(r[k], 1e-8) for r in rows], 0.27, label=label)
    ax.set_xticks(x, [r["method"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("relative error")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def approx(cfg: DictConfig) -> list[dict[str, Any]]:
    """Compress with each method, measure, write the outputs; returns the table rows."""
    configs = method_configs(cfg)
    checked = {m: preflight(mc) for m, mc in configs.items()}  # every method's options, before any model loads
    first = next(iter(configs.values()))
    L.seed_everything(cfg.seed)  # the task head is random: seed it as a training run does, so the probe matches
    datamodule, module = build_data_and_module(first, checked[next(iter(configs))][1])
    original = module.model.eval()
    batch = datamodule.probe_batch(cfg.approx_metrics.probe_size)
    rows = []
    for m, mc in configs.items():
        if m == "none":
            rows.append(row(m, {}, count_params(original), 0.0))
            continue
        f = mc.ffn_mode
        model = copy.deepcopy(original)
        fn = instantiate(f.compress)
        report = compress_model(
            model, method=m, fn=fn, layers=list(f.layers), mid_dim=f.mid_dim, seed=f.seed,
            options={**fn.keywords, "identity": model_identity(mc.model)}, cache=FusionCache(Path(f.cache_dir) / m) if f.cache else None,
        )
        metrics, _ = approximation_metrics(original, model, list(f.layers), batch, module.probe_fns, cfg.approx_metrics.chunk_size)
        rows.append(row(m, metrics, report.params_after, report.seconds))
        log.info("%s: NTK sign err %.4f, output err %.4f, %.2fs", m, metrics["fusion/ntk_sign_rel_err"], metrics["fusion/output_rel_err"], report.seconds)
    out = Path(cfg.paths.output_dir)
    f = next(c.ffn_mode for c in configs.values() if c.ffn_mode.name != "none") if any(m != "none" for m in configs) else None
    meta = {"model": cfg.model.name, "task": cfg.task.name, "layers": list(f.layers) if f else None, "mid_dim": f.mid_dim if f else None,
            "seed": cfg.seed, "probe_size": int(batch["input_ids"].shape[0])}
    write_json(out / "approx.json", {**meta, "rows": rows})
    table = markdown(rows)
    write_text(out / "approx.md", f"# {cfg.model.name} on {cfg.task.name}: layers {meta['layers']}, mid_dim {meta['mid_dim']}\n\n{table}")
    chart(rows, out / "approx.png", f"{cfg.model.name}, layers {meta['layers']}, mid_dim {meta['mid_dim']}")
    log.info("approximation of each method (written to %s):\n%s", out, table)
    return rows


@hydra.main(version_base="1.3", config_path="../conf", config_name="approx")
def main(cfg: DictConfig) -> None:
    try:
        approx(cfg)
    except ConfigError as e:
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()

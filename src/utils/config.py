"""Hydra glue shared by the entry points: the config resolvers, the method registry and its variant options.

Imported by every entry point before Hydra composes (it registers the resolvers).
"""

from __future__ import annotations

from pathlib import Path

from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# ${tag:k,${ffn_mode.mid_dim}} -> "-k384", or "" when the value is null (default width).
OmegaConf.register_new_resolver("tag", lambda prefix, value: "" if value is None else f"-{prefix}{value}", replace=True)

# The ffn_mode options that make a variant of a method (ntk_keep at keep 0.25 is not ntk_keep at
# 0.5): src.train records them in results.json and src.report gives each variant its own row.
VARIANT_OPTIONS = ("keep", "refit", "weighting", "budget")


def ffn_modes() -> list[str]:
    """Every compression method: the options of the ``ffn_mode`` config group, the one registry.

    Asks the running Hydra app's config loader (so ``--config-dir`` and ``hydra.searchpath`` add
    methods), or the project's ``conf/`` outside an app. Files starting with ``_`` are shared parts.
    """
    if GlobalHydra.instance().is_initialized():
        loader, kwargs = GlobalHydra.instance().config_loader(), {}
        if HydraConfig.initialized():  # the app's own search path, hydra.searchpath overrides included
            hc = HydraConfig.get()
            kwargs = {"config_name": hc.job.config_name, "overrides": [*hc.overrides.hydra, *hc.overrides.task]}
        options = loader.get_group_options("ffn_mode", **kwargs)
    else:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            options = GlobalHydra.instance().config_loader().get_group_options("ffn_mode")
    return sorted(o for o in options if not o.startswith("_"))

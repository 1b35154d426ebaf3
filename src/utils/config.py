"""OmegaConf resolvers the configs use; imported by every entry point before Hydra composes."""

from omegaconf import OmegaConf

# ${tag:k,${ffn_mode.mid_dim}} -> "-k384", or "" when the value is null (default width).
OmegaConf.register_new_resolver("tag", lambda prefix, value: "" if value is None else f"-{prefix}{value}", replace=True)

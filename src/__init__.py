"""mlp-fusion: fine-tune language models whose MLPs were compressed by NTK-approximating MLP fusion."""

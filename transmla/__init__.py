"""transmla: convert multi-head / grouped-query attention checkpoints to Multi-head Latent Attention."""

__version__ = "0.1.0"

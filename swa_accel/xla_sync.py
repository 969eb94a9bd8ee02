"""The one thing the core needs from torch_xla: cutting the lazy trace in loops accelerate does not wrap (the BN
recompute), so every pass reuses the same few graphs. torch_xla is imported only when called, on XLA."""


def mark_step() -> None:
    """Cuts the lazy trace and runs it (one graph per call site and shape, compiled once)."""
    import torch_xla.core.xla_model as xm

    xm.mark_step()

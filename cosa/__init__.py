"""CoSA toolkit: weakly supervised semantic segmentation with Co-training with Swapping Assignments.

The research core (config, model, losses, data, training, evaluation). It imports neither
`cosa.export` nor `cosa.serving`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

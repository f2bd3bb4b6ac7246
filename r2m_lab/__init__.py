"""r2m_lab: fine-tune one deepfake detector per forgery family, merge them without retraining, measure generalisation.

The package is importable without Hydra being initialised; `python -m r2m_lab` is the Hydra entry point.
"""

__version__ = "0.1.0"

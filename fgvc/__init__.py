"""fgvc: an MLflow-tracked experiment suite for designer-level fashion classification."""

__version__ = "0.1.0"

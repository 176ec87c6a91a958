"""DraftFlow: train EAGLE3 draft models, colocated or disaggregated."""

__version__ = "0.1.0"

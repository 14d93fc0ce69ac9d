"""DINO: self-distillation with no labels."""

__version__ = "0.1.0"

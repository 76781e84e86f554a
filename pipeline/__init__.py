"""Efficient language-image pre-training: ELIP and EVLGen token reduction under DeepSpeed."""

__version__ = "0.1.0"

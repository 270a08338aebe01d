"""retnet_train: pretraining RetNet language models (arXiv 2307.08621) at 1.3B-13B scale."""

__version__ = "0.1.0"

"""bertforge: train BERT-style encoders from scratch and put them to work."""

__version__ = "0.1.0"

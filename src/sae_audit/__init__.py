"""Audit whether sparse-autoencoder features survive language-model compression."""

__version__ = "0.1.0"

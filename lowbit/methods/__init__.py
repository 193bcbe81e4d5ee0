"""The five compression methods, one module per paper; each registers its recipe."""

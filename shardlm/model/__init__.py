"""Transformer models written once, for one device, naming logical axes only."""

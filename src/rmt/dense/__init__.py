"""Shared pieces of the dense-prediction tasks: configs and the training loop."""

"""Federated learning: strategies, the client update pipeline, and the server round logic."""

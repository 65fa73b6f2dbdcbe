"""Scaling laws: functional forms, fits with uncertainty, frontiers and plots of evaluation results."""

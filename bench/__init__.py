"""Measuring tools for the Show-1 cascade (script/gpu-check). Not part of the served image."""

"""Mask stage: per-class mask head on RoIAlign crops, its targets, loss and pasting into images."""

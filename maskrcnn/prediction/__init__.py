"""Prediction: one image through a Detector (scale, TTA, tiles), folders of images, streamed large images."""

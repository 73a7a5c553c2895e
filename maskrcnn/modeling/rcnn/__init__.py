"""RCNN stage: box classification and refinement on RoIAlign crops of the proposals."""

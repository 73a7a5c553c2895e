"""Region proposal network: anchors, the multi-level head, targets, loss and NMS proposals."""

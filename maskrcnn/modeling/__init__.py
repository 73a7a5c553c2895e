"""The network: backbone + FPN, the RPN, RCNN and mask stages, their shared box primitives, checkpoints."""

"""Run-time plumbing: atomic files, run locks, signals, memory budgets, precision, torch.distributed."""

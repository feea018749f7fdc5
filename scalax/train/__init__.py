"""Training: state, optimizer, the pure train step, checkpoints, metrics and the loop that drives them."""

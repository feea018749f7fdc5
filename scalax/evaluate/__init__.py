"""Evaluations of trained models beyond the training loop: the loss at other lengths (`scalax eval`)."""

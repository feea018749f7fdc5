"""Cloud TPU: slices and prices (tpus), placement by memory plan, the commands, the launcher, status."""

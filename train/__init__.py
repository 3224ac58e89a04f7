"""Training programs (thin: arguments, wiring, progress, results): python -m train.pretrain."""

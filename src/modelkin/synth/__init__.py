"""Checkpoints modelkin writes: make-tiny, upcycled MoE, demo variants."""

"""Checkpoints modelkin writes: make-tiny checkpoints (tiny), MoGE models upcycled from dense ones (upcycle) and
controlled relatives of a dense model for the demo and tests (variants). Writers only: nothing here compares.
"""

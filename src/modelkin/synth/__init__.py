"""Checkpoints modelkin writes: MoGE models upcycled from dense ones (upcycle) and controlled relatives of a
dense model for the demo and tests (variants). Writers only: nothing here reads a model to compare it.
"""

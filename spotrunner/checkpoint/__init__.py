"""Checkpointing: the writer lease that fences out a second writer, and the checkpoint manager."""

"""Merging: pure tensor math, mergekit YAML, parameter resolution, validation, and the disk/in-memory engine."""

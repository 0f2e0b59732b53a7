"""A run directory read and written: the journal, trials, results, Pareto front, report and plots.

Read-only commands (status, export, report) import only this package: no torch, no Ray.
"""

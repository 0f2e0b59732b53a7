"""The search: the driver loop (start, resume), the scheduler, Ray cluster and workers, progress, tracking."""

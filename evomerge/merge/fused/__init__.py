"""The GPU workers' per-candidate merge: flat resident sources, parameter tables, one Triton launch.

`candidate.py` picks this path or the reference engine per worker; `sources.py` holds the flat
buffers and drives the kernels in `kernels.py` with the tables built in `tables.py`.
"""

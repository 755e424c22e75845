"""Sweeps: the guide's ablations as one command. `plan` decides the runs, `runs` trains them as `fit`
subprocesses (skip, resume, failures), `results` and `plots` tabulate and draw them. See docs/sweeps.md.
"""

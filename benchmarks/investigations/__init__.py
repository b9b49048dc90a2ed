"""One-off investigations (kernel post-mortems, probes): kept to reproduce a result in ``benchmarks/results/``.

Run from the repository root: ``python -m benchmarks.investigations.NAME --help``.
"""

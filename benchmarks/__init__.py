"""The benchmark suites (run from the repository root: ``python -m benchmarks.NAME --help``).

The package itself comes from the installed ``stun_lightning``; this folder is a package only so the
suites and ``investigations/`` share their helpers by plain imports.
"""

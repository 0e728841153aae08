"""IFEval benchmark of specfuse: members alone, whole-answer re-ranking, and SpecFuse modes.

Run ``python -m benchmarks.ifeval --help``; the code lives in :mod:`benchmarks.ifeval.run`.
"""

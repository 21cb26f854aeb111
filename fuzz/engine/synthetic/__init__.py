"""Small models built deterministically in code, for tests and benchmarks.

- ``tiny``: tiny configs, seeded random weights, the tiny models, the planted "7" trigger;
- ``planted``: the digit-run and count-trigger families (overflow on a planted pattern).
"""

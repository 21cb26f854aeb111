"""From a failing prompt to a regression case every machine reproduces.

- ``minimize``: delta debugging on the text after Hypothesis's structural shrink;
- ``robustness``: the kernel variations; a finding's margin and robustness; finalize (minimize,
  then measure).
"""

"""`fuzz screen`: the prompt sets a user deploys with, screened under every policy.

- ``job``: the work (every prompt x policy x BOS mode not yet done, of this shard) and the loop;
- ``results``: the results file (one JSON line per item, resumable, never a partial line);
- ``summary``: per policy, the non-finite share with its 95% interval and the signatures;
- ``report``: the summary as text, Markdown, HTML and JSON.
"""

"""`fuzz advise`: which precision policy to ship, measured here.

- ``measure``: every policy on the corpus, the sampled prompts (speed, batch by batch) and the
  teacher-forced sequences; ``inputs`` (prompts, machine facts), ``text`` (the text set), ``kld``
  (teacher-forced logits), ``stats`` (KLD and the intervals), ``result`` (what was measured);
- ``rule``: the recommendation, how sure it is, why each other policy lost;
- ``report`` and ``plot``: text, Markdown, HTML, JSON and the KLD-vs-speed picture;
- ``command``: the command line (fuzz.cli wires it).
"""

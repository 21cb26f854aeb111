"""`fuzz advise`: which precision policy to ship, measured here.

- ``measure``: every policy on the corpus and on sampled prompts (finiteness, agreement with
  float32, speed, headroom) and the recommendation;
- ``report``: its text, Markdown, HTML, JSON and the agreement-vs-speed picture.
"""

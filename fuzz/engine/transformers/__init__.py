"""transformers' own Gemma classes as an engine (`--engine transformers`).

- ``engine``: the adapter (DynamicCache, left padding by attention mask and position ids);
- ``build``: our config and float32 state as a transformers model, or an HF directory loaded
  with from_pretrained;
- ``hooks``: its probe, with the built-in site names and order;
- ``mitigate``: a mitigated policy's Numerics on its Gemma 1/2/3 layers (as the built-in engine);
- ``zoo``: tiny Gemma 3n / Gemma 4 models (transformers engine only) and the planted overflow.
"""

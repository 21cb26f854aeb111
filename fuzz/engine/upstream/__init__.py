"""google/gemma_pytorch itself as an engine (`--engine upstream`): ``engine`` adapts its
GemmaForCausalLM to the generation loop, ``hooks`` probes it with the built-in site names,
``mitigate`` runs a mitigated policy on it (also fuzz.mitigate.apply on a user's model)."""

"""gemma-fuzz: prompt fuzzing and regression suite for Gemma NaN/Inf in reduced precision."""

__version__ = "0.1.0"

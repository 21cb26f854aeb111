"""The user's own prompts: prompt files (`files`: text, JSONL, CSV/TSV, Parquet, each prompt with
its file:line) and chat turns rendered with the model's template (`chat`). What `fuzz screen`
screens and `fuzz run --seed-prompts` starts from."""

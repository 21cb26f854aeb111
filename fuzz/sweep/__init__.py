"""`fuzz sweep`: every vocabulary token as the next token after one prefix (fuzz.next_token),
its resumable results file, summary, picture and saved findings (fuzz.sweep.command)."""

"""The study stage: the sparse perplexity sweep, the downstream task sweep and the harness wrapper (run_study.py drives them)."""

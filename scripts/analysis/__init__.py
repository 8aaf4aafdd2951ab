"""Analyses of a collection: drift, lookahead, sparsity statistics, the summary's predictors, perplexity, and what they share (common.py)."""

"""Evaluation: standard perplexity (knowledge-intensive LLM-KICK tasks come later)."""

from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]

"""Evaluation: standard perplexity (:func:`perplexity`, here), the knowledge-intensive LLM-KICK tasks
(:mod:`.tasks`: factoid QA, MMLU, in-context retrieval QA, summarization) and the reports a person reads
(:mod:`.report`)."""

from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]

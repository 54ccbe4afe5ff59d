"""attnlab: a bench for GPT-style transformers with pluggable attention."""
__version__ = "0.1.0"

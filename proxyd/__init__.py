"""proxyd: the data plane of an LLM API relay."""

__version__ = "0.1.0"

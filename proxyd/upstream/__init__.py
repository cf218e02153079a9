"""Upstream: the only package that opens connections to providers."""

"""Relay: one call to a channel and its answer back to the client, retried only before the
first byte."""

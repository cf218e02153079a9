"""Wire formats: endpoints, error bodies, usage, SSE framing, and translation between OpenAI
and Anthropic.

Pure package: no aiohttp, no I/O.
"""

"""Server: the client listener's handlers and what they need from aiohttp."""

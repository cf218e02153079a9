"""Routing: which channels may serve a call, in what order, and how healthy each is."""

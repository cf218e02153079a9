"""Observability: metrics, logs and the scrape-time sources."""

"""State: keys, prices, channels and balances in memory, their schemas, and their sync between
instances."""

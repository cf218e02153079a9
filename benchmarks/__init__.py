"""proxyd's benchmark suite: the mock provider, a load client and a driver, measured side by side.

A direct connection, nginx and proxyd run in the same session, reported as deltas and ratios.
"""

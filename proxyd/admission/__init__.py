"""Admission: who is calling (authenticate) and whether they may (limits, balance, spend,
resale)."""

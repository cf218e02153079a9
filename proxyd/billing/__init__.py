"""Billing: one usage record per authenticated request, written without loss."""

"""Client wire formats: how each protocol names its endpoints and renders proxyd's errors."""

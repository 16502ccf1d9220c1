"""Development helpers that are not part of the deployed portal."""

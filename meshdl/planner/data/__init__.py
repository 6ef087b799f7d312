"""Numbers transcribed from the three seed systems (facts, not code): see ``seeds``."""

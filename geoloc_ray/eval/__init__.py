"""Offline evaluation: the four variants, image- and location-level recall, per platform, corruptions."""

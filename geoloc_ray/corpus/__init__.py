"""Corpus readers: every dataset format becomes a list of `Record`s."""

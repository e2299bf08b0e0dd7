"""Preprocessing: text cleaning and sentence filtering, image checks, the prepare stage."""

"""geoloc_ray: PE-MoE text-to-image geo-localization on Ray."""
__version__ = "0.1.0"

"""A procedural world for text-to-image geo-localization: buildings seen from satellite, drone and street.

`synth_world` writes it in the GeoText-1652 / University-1652 layout so every reader treats it like the
real dataset; `contact_sheet` renders one location's views for a human to check.
"""

from geoloc_ray.corpus.synth.build import synth_from_config, synth_world
from geoloc_ray.corpus.synth.contact import contact_sheet
from geoloc_ray.corpus.synth.views import render_location
from geoloc_ray.corpus.synth.world import Location, sample_world

__all__ = ["Location", "contact_sheet", "render_location", "sample_world", "synth_from_config", "synth_world"]

"""Caption refinement (the report's textual domain alignment): rewrite each training caption so it only
describes what the image's platform can see. Backends: rules (default), transformers, vLLM (ray.data.llm).
"""

from geoloc_ray.captions.stage import run_refine

__all__ = ["run_refine"]

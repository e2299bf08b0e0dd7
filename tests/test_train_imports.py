"""The training worker's modules import one way, even counting imports made only for type checking
(`pyproject.toml`'s import-linter contracts leave those out)."""

from __future__ import annotations

import grimp

# each module may import those to its right, never one to its left
WORKER = ["loop", "kinds", "steps", "encode", "worker_types"]


def test_the_worker_modules_have_no_cycle_under_type_checking() -> None:
    graph = grimp.build_graph("geoloc_ray", exclude_type_checking_imports=False)
    names = [f"geoloc_ray.train.{m}" for m in WORKER]
    backwards = [(low, high) for i, high in enumerate(names) for low in names[i + 1:]
                 if graph.chain_exists(importer=low, imported=high)]
    assert backwards == []


def test_the_worker_types_module_is_a_leaf_of_the_train_package() -> None:
    graph = grimp.build_graph("geoloc_ray", exclude_type_checking_imports=True)
    imported = graph.find_modules_directly_imported_by("geoloc_ray.train.worker_types")
    assert not [m for m in imported if m.startswith("geoloc_ray.train")]

"""Which node types the cluster could start: what a resource check must read before refusing a request.

KubeRay (and autoscaler v2) report the worker groups to the GCS, where `ray._private.state` reads them. The
cluster launcher's autoscaler (v1: `ray up cluster.yaml`, the fake multi-node provider) reports nothing there,
so on such a cluster a GPU type at `min_workers: 0` looked like no GPU at all. `publish_node_types` writes the
same record from an autoscaling config (cluster.yaml's head start command and the rehearsal call it), which
Ray Data's own autoscaling check reads too. Without a record, checks compare with the nodes up now.

    python -m geoloc_ray.cluster_types ~/ray_bootstrap_config.yaml     # on the head, after `ray start`
"""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger(__name__)


def node_types() -> dict[str, dict[str, float]] | None:
    """Resources per node of every type the autoscaler may start (types capped at 0 nodes left out), from the
    GCS's cluster config; None when no autoscaler reported one."""
    import ray._private.state

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception as exc:  # a Ray without the record, or no GCS to ask: nothing known
        log.debug("no cluster config in the GCS: %s", exc)
        return None
    if config is None or not config.node_group_configs:
        return None
    return {g.name: {k: float(v) for k, v in g.resources.items()} for g in config.node_group_configs
            if g.max_count != 0}


def live_nodes() -> dict[str, dict[str, float]]:
    """Resources of the nodes up now, by node id (a fixed cluster or a local instance: all there will be)."""
    import ray

    return {n["NodeID"][:12]: {k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n["Alive"]}


def offered_nodes() -> tuple[dict[str, dict[str, float]], str]:
    """(nodes a request may land on, what they are) for a resource check: the autoscaler's node types when
    published, else the live nodes (a fixed cluster, a local instance, or an autoscaler that published none)."""
    types = node_types()
    if types is not None:
        return types, "the autoscaler's node types"
    return live_nodes(), ("the current nodes (no node types are published: a fixed cluster or a local instance; "
                          "on a cluster launcher's autoscaler publish them with `python -m "
                          "geoloc_ray.cluster_types ~/ray_bootstrap_config.yaml` as cluster.yaml does)")


def cluster_config_proto(config: dict[str, Any]):
    """An autoscaling config (cluster.yaml layout) as the GCS's `ClusterConfig` record: one node group per worker
    type with its declared resources and min/max workers."""
    from ray.core.generated import autoscaler_pb2

    proto = autoscaler_pb2.ClusterConfig()
    head = config.get("head_node_type")
    for name, spec in config["available_node_types"].items():
        if name == head:
            continue
        resources = {k: int(v) for k, v in (spec.get("resources") or {}).items() if k != "object_store_memory"}
        if not resources:
            raise ValueError(f"node type {name!r} declares no resources: write them out (CPU, GPU, ...) so Ray "
                             "can know what the type offers before one starts")
        group = proto.node_group_configs.add(name=name, min_count=int(spec.get("min_workers", 0)),
                                             max_count=int(spec.get("max_workers", config.get("max_workers", 0))))
        group.resources.update(resources)
    return proto


def publish_node_types(config: dict[str, Any]) -> None:
    """Write the node types of an autoscaling config to the GCS record KubeRay fills (needs `ray.init` first)."""
    import ray._raylet
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(),
                     cluster_config_proto(config).SerializeToString(), overwrite=True,
                     namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode())


def main(argv: list[str] | None = None) -> int:
    """`python -m geoloc_ray.cluster_types CONFIG.yaml [ADDRESS]`: publish CONFIG's node types to the cluster."""
    import ray
    import yaml

    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    with open(args[0]) as f:
        config = yaml.safe_load(f)
    ray.init(address=args[1] if len(args) > 1 else "auto", log_to_driver=False)
    try:
        publish_node_types(config)
        print(f"published node types {sorted(node_types() or {})}")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A real two-node Ray cluster on this one machine, for the multi-node tests.

Run as a script in its own process (`python tests/ray_cluster.py SETTINGS_JSON`), so that the
cluster's Ray state never mixes with the test process's own. It starts a head node and a second
node with `ray.cluster_utils.Cluster` (separate raylets, object stores and node ids; token
authentication as set in its environment), prints one JSON line
`{"address": GCS_ADDRESS, "head": NODE_ID, "worker": NODE_ID}`, then obeys its stdin:
`remove-worker` kills every process of the second node at once, as when a machine dies, and
prints `removed`; end of input shuts the whole cluster down.
"""

from __future__ import annotations

import json
import sys


def main(settings: dict) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=settings["head"])
    worker = cluster.add_node(**settings["worker"])
    cluster.wait_for_nodes()
    print(json.dumps({"address": cluster.address, "head": cluster.head_node.node_id, "worker": worker.node_id}),
          flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "remove-worker":
                cluster.remove_node(worker, allow_graceful=False)
                print("removed", flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

"""Print the Ray node id of this machine's node (for `ray drain-node --node-id`).

Run by the agent as `python -m agent_bootstrap.ray_node_id` with `RAY_ADDRESS` and the
token variables set: a short-lived driver that connects through the local raylet.
"""

from __future__ import annotations

import logging
import os


def main() -> int:
    import ray

    ray.init(
        address=os.environ.get("RAY_ADDRESS", "auto"),
        log_to_driver=False,
        logging_level=logging.ERROR,
        configure_logging=False,
    )
    try:
        print(ray.get_runtime_context().get_node_id(), flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run the operator: `python -m rollfleet_operator [--namespace NS ...]`.

Watches RLJobs in every namespace (or only those given), in standalone mode (one replica, no
peering objects), and serves kopf's liveness probe at :8080/healthz. Settings come from
$ROLLFLEET_OPERATOR_CONFIG (see config.py); the NATS account signing key from the directory
$ROLLFLEET_NATS_SIGNER_DIR (see handlers.py).
"""

from __future__ import annotations

import argparse
import logging

import kopf

from rollfleet_operator import handlers  # noqa: F401  (registers the handlers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rollfleet_operator", description=__doc__)
    parser.add_argument("--namespace", action="append", default=[], help="watch only these")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness,
    )


if __name__ == "__main__":
    main()

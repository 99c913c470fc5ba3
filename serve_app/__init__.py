"""The Serve applications: the control plane's (ingress, accounts, billing actor, supply
reconciler) and the supply pools' (gateway, model replicas)."""

import logging

# httpx logs every request it sends at INFO, and a Serve replica's logging keeps INFO: the
# ingress wrote a JSON line per generation it sent to a pool, and every replica-list poll
# (2% of its CPU at c=16, issue 13). Its warnings and the platform's own errors still log.
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).setLevel(logging.WARNING)

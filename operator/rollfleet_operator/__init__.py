"""The rollfleet operator: reconciles RLJob resources into rollout pools, a trainer, a reward
service and env sandboxes (kopf). Start it with `python -m rollfleet_operator`.

- config.py: the operator's settings (images, NATS, GPU classes), written by the Helm chart
- render.py: RLJob -> Kubernetes manifests (pure)
- status.py: progress and children's health -> RLJob status (pure)
- kube.py: a small REST client for the children
- handlers.py: the kopf handlers tying these together
"""

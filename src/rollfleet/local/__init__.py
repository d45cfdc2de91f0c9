"""The embedded runtime: runs an RLJob's plan as local processes around an embedded NATS."""

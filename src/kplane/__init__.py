"""kplane: a Kubernetes-compatible control plane and node agent, secure on every control-plane <-> node path."""

__version__ = "0.1.0"

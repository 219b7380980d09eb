"""Kubernetes: where to capture a pod, asked of the node's container runtime over CRI."""

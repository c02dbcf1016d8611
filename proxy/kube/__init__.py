"""Kubernetes tools: `inject` and the explicit method's services file. Never imported by the running proxy."""

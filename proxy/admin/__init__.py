"""The Envoy-shaped admin HTTP API."""

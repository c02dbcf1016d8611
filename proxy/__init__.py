"""sidecar-proxy: a transparent TCP proxy for the redirected port of a service-mesh sidecar."""

__version__ = "0.1.0"

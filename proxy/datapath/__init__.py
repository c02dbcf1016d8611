"""The data path: one connection from accept to close (see listener.py)."""

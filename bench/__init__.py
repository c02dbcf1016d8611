"""The benchmark: the proxy against the physical limit and its peers, through a real redirect.

Run it with `sudo python -m bench` (see bench/README.md).
"""

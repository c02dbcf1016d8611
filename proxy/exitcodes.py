"""The exit codes of every `sidecar-proxy` command."""

EXIT_OK = 0  # done (also after a clean drain on SIGTERM)
EXIT_FAILURE = 1  # the proxy could not start, or stopped on an error of its environment
EXIT_USAGE = 2  # bad input: flags, a config file, the environment

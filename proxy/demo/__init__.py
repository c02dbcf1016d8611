"""The demo and the throwaway namespaces it (and the tests) run in. Never imported by the running proxy."""

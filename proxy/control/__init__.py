"""The process that runs the data path: start-up, signals, drain, workers, logs."""

"""Click launchers for the pipeline stages; each module also runs as `python -m jobs.<name>`."""

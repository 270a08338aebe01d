"""Fast GPU paths for retention. Each has a pure-torch fallback in ../retention.py and is tested against it."""

"""Command-line entry points: the only place that parses argv. scripts/*.py wrap these."""

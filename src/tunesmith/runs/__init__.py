"""Runs side by side: `tunesmith runs` lists run dirs (scan.py reads one, table.py prints many) and
`tunesmith runs compare` puts two or more on one HTML page (compare.py). Read-only, and torch-free: the run
dir's files (manifest.json, config.yaml, metrics.jsonl, plan.json, eval/) are the whole interface."""

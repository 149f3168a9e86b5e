"""Sweeps: a grid or an Optuna search over config keys, each trial an ordinary run dir (`tunesmith sweep`).

`space.py` parses what varies, `study.py` owns the shared Optuna study (storage, claiming, recovery),
`trial.py` trains one trial in a child process and follows it, `report.py` writes what the sweep found,
`run.py` is the command: workers, their loop, the summary.
"""

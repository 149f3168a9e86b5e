"""`python -m tunesmith ...` (what torchrun launches: torchrun --nproc-per-node N -m tunesmith train cfg.yaml)."""

from tunesmith.cli import main

main()

"""`python -m tunesmith ...`: what torchrun launches (torchrun --nproc-per-node N -m tunesmith train)."""

from tunesmith.cli import main

main()

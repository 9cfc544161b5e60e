"""`python -m crossmodalnet ...` (also what `torchrun -m crossmodalnet train ...` runs)."""

from crossmodalnet.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

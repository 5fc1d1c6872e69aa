"""`python -m bertforge` runs the CLI."""

from bertforge.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

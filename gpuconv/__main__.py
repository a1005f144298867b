"""``python -m gpuconv``: the same command line as the ``gpuconv`` console script."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())

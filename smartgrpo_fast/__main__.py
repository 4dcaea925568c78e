"""``python -m smartgrpo_fast``: the ``smartgrpo-fast`` command line."""

from smartgrpo_fast.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

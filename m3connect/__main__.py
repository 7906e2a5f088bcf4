"""``python -m m3connect``: the same as the ``m3connect`` command."""

from m3connect.cli import main

if __name__ == "__main__":
    main()

"""`python -m gardenctl` is the same as the `gardenctl` command."""

from gardenctl.cli import main

if __name__ == "__main__":
    main()

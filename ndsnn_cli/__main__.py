"""`python -m ndsnn_cli ...` (and `torchrun -m ndsnn_cli ...`) run the same app as `ndsnn`."""

from ndsnn_cli.cli import main

if __name__ == "__main__":
    main()

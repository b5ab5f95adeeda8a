"""Interruptions the command line reports in one line (bad input is a ValueError or OSError, see taq.cli)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying what was kept and how to go on: "12 of 64 trajectories are kept in ...; run the same
    command again to resume"."""

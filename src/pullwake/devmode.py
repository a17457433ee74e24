"""``pullwake dev``: embedded services, migrations, the API and a demonstration (WIP)."""

from __future__ import annotations

import argparse


def run_dev(args: argparse.Namespace) -> int:
    """Run everything on one machine."""
    return 0

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Under pytest-xdist, share the cores among the workers (and the CLI processes they start) instead
# of letting every one start a thread per core: oversubscribed, the torch tests ran several times slower.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """Under `--dist loadgroup` every test is scheduled on its own (files are too uneven to balance
    two workers), except the Slurm tests: they share one expensive cluster, started once on the
    worker that runs them all. Slow tests go first, so that the short ones fill in at the end
    instead of one worker waiting for the other's last long test."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise

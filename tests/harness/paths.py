"""Where the checkout is, for tests that run its scripts or benches."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

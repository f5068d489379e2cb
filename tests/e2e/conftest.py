"""Fixtures of the e2e tier. Add yours below; keep each fixture's logic in a helper module."""

import pytest
from tinyimage import build_tiny_image


@pytest.fixture(scope="session")
def tiny_image():
    """The tiny guest image (raw, qcow2, xz, SHA256SUMS in one directory), built once and cached
    in .cache/images/tiny across runs; rebuilt only when the build script or its inputs change.
    Serve it with ``http_server(tiny_image.directory)``; never write to its files (use an overlay)."""
    return build_tiny_image()

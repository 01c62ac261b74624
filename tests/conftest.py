"""Test setup: 8 fake CPU devices, so sharded code can be checked against one device."""
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fixture_rows():
    """The 200 reference problems of ../shared/fixtures (skips when shared/ is absent)."""
    from tests.traces import mutations

    if not os.path.exists(mutations.FIXTURES):
        pytest.skip(f"fixtures not found at {mutations.FIXTURES}")
    return mutations.load_rows()

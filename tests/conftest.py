"""Test setup: 8 fake CPU devices, so sharded code can be checked against one device."""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the whole run, made by the pytest process that
# starts first (the xdist controller, or a plain run) and inherited by its workers and by the
# scripts tests start: the same programs compile again in many modules (each module's end
# drops the in-memory caches, below) and in subprocesses, and a cache hit loads the compiled
# program instead. Removed when that process exits; a caller's own JAX_COMPILATION_CACHE_DIR
# is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _compile_cache = tempfile.mkdtemp(prefix="jaxapr-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _compile_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    atexit.register(shutil.rmtree, _compile_cache, ignore_errors=True)


import pytest


@pytest.fixture(scope="session")
def fixture_rows():
    """The 200 reference problems with traces of the original APR solver (tests/data)."""
    from tests.traces import mutations

    return mutations.load_rows()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop JAX's compile caches after each test module. Every compiled XLA:CPU executable
    holds its own memory mappings until it is freed; over the whole suite in one process they
    would pass the kernel's per-process map limit (vm.max_map_count, 65,530 by default) and
    XLA then fails to compile ("Cannot allocate memory")."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()

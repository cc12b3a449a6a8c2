"""In-process measurement, the part a plug-in may use too: device-synchronised timing (timing) and
memory peaks (memory: CUDA's counters, the resident high-water mark). bench.run decides how a
cell is measured with them. The memory primitives import from here as they did when this was
one module."""

from bench.measure.memory import (  # noqa: F401
    MALLOC_ENV,
    cuda_peak_bytes,
    rss_peak_bytes,
    rss_supported,
    synchronize,
    tensor_bytes,
)

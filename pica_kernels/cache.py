"""The on-disk basis cache (``PICA_KERNELS_CACHE``): a second ``apply_pica`` / ``load_adapter`` of the same
weights skips the truncated SVD. ``pica_kernels.cache.clear()`` empties it. See :mod:`pica_kernels.core.cache`."""

from .core.cache import (
    DEFAULT_MAX_BYTES,
    ENV_DIR,
    ENV_MAX_BYTES,
    CacheWarning,
    clear,
    directory,
    evict,
    max_bytes,
    reset_stats,
    size_bytes,
    stats,
)

__all__ = [
    "DEFAULT_MAX_BYTES", "ENV_DIR", "ENV_MAX_BYTES", "CacheWarning", "clear", "directory", "evict", "max_bytes",
    "reset_stats", "size_bytes", "stats",
]

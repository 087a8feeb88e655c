"""Data sources -> normalized float32 NHWC arrays and int32 labels."""
from evolq_jax.data.sources import SOURCES, SplitTooSmall, class_count, load_split

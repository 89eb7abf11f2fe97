"""The tiny random checkpoints the tests build, re-exported from their importable home,
`modeling_vip2clip.testing_utils` (the benchmarks import them from there too)."""

from modeling_vip2clip.testing_utils import *  # noqa: F401,F403
from modeling_vip2clip.testing_utils import NATIVE_IMAGE_SIZE, PATCH, __all__  # noqa: F401

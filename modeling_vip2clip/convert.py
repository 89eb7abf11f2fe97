"""Old name of `official_checkpoint` (the authors' checkpoint converter; `vip2clip convert` converts datasets)."""

from .official_checkpoint import *  # noqa: F401,F403
from .official_checkpoint import __all__  # noqa: F401

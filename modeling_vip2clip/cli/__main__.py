"""`python -m modeling_vip2clip.cli COMMAND ...`: the same as `vip2clip COMMAND ...`."""

from .main import main

raise SystemExit(main())

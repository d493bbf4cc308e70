"""``python -m polar_vbll_cli ...`` is ``polar-vbll ...``."""

from polar_vbll_cli.app import main

main()

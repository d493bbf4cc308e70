"""The ``polar-vbll`` command line: the top floor, above ``tune_spaces``, ``distributed`` and ``polar_vbll``."""

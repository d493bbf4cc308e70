"""Ray Tune searches over polar-vbll run configs: the search spaces and the driver (``polar-vbll tune``).

Sits above ``distributed`` (each trial is a distributed training run) and ``polar_vbll``; needs the
``dist`` and ``track`` extras.
"""

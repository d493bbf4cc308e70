"""Side-by-side comparison of PoLAR-VBLL with the baselines (``polar-vbll compare``)."""

"""Distributed PoLAR-VBLL: Ray Train workers, DeepSpeed ZeRO for the frozen backbone, a driver-side head
coordinator. Entry points: ``distributed.launch.train_distributed`` and ``python -m distributed.launch``;
see docs/distributed.md. Importing this package imports neither Ray nor DeepSpeed."""

"""The method: losses, teacher, multi-scale CAMs and pseudo-labels, metrics, CRF, overlays, devices, and the training engine."""

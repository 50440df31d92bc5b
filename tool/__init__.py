"""The method: losses, teacher, multi-scale CAMs and pseudo-labels, the training losses of one batch, the segmentation stage's loss and inference, and overlays."""

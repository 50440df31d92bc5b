"""PASCAL VOC 2012 list files, image-level labels and the command that derives labels."""

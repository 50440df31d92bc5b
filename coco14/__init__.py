"""MS COCO 2014 support.

``python -m coco14.prepare_coco --coco_root R`` writes this folder's ``train.txt``,
``val.txt`` and ``cls_labels.json`` (80 contiguous classes) and the ground-truth masks
``R/SegmentationClass/<name>.png`` with their ``convention.json``; see
:mod:`coco14.prepare_coco` for the conventions.
"""

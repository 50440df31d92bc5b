"""Class names and ids of PASCAL VOC 2012 and MS COCO 2014.

Index 0 is background in both. COCO category ids (1..90, ten unused) map to contiguous
segmentation ids 1..80 in sorted-id order; ``COCO_CATEGORY_IDS[i-1]`` is the raw id of
contiguous id ``i``.
"""
from __future__ import annotations

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)

_COCO = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
COCO_CATEGORY_IDS = tuple(i for i, _ in _COCO)
COCO_CLASSES = ("background",) + tuple(n for _, n in _COCO)
COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)

# coco14/prepare_coco.py records the id convention of the masks it writes in this file,
# beside them; evaluation reads it to pick the class count.
CONVENTION_FILE = "convention.json"

# Raw-id convention (91 classes): index = raw category id, unused ids named "unused-<id>".
COCO_RAW_CLASSES = ("background",) + tuple(dict(_COCO).get(i, f"unused-{i}") for i in range(1, 91))


def class_names(num_classes: int) -> tuple[str, ...]:
    """Names for a class count: 21 VOC, 81 COCO contiguous, 91 COCO raw ids, else generic."""
    for names in (VOC_CLASSES, COCO_CLASSES, COCO_RAW_CLASSES):
        if len(names) == num_classes:
            return names
    return ("background",) + tuple(f"class{i}" for i in range(1, num_classes))

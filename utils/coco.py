"""COCO JSON for val.py --save-json: predictions in COCO's results format, ground truth written from YOLO labels
when a dataset has no annotations file, and pycocotools' COCOeval on the evaluated images.

Image ids are the file stems (as int when numeric: 000000000139.jpg -> 139), category ids the dataset's
`category_ids` (COCO's 91-id numbering for the 80 COCO classes) or the class index itself.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from utils.general import LOGGER, coco80_to_coco91_class, xyxy2xywh


def image_id(path: Path):
    return int(path.stem) if path.stem.isnumeric() else path.stem


def category_ids(data):
    """Class index -> COCO JSON category id: COCO's 91-id map, the dataset's category_ids, or the index itself."""
    if isinstance(data.get("val"), str) and data["val"].endswith(f"coco{os.sep}val2017.txt"):
        return coco80_to_coco91_class()
    if data.get("category_ids"):
        return list(data["category_ids"])
    return list(range(1000))


def save_one_json(predn, jdict, path, class_map):
    """COCO results: {image_id, category_id, bbox [x_min, y_min, w, h], score}."""
    box = xyxy2xywh(predn[:, :4])
    box[:, :2] -= box[:, 2:] / 2
    for p, b in zip(predn.tolist(), box.tolist()):
        if int(p[5]) >= len(class_map):  # a class the dataset does not have: no category to report it under
            continue
        jdict.append({"image_id": image_id(path), "category_id": class_map[int(p[5])],
                      "bbox": [round(x, 3) for x in b], "score": round(p[4], 5)})


def json_from_labels(dataset, class_map, names, file) -> Path:
    """COCO detection ground truth of a YOLO-labelled dataset (a LoadImagesAndLabels): its images with their sizes,
    one annotation per label box in pixels (area = box area, iscrowd 0), categories from `class_map` and `names`.
    COCO's own files measure 'area' on segmentation masks and mark crowds, so small/medium/large splits and crowd
    handling differ from an official annotations file; the overall boxes are the same."""
    images, annotations = [], []
    for f, (w, h), labels in zip(dataset.im_files, dataset.shapes, dataset.labels):
        iid = image_id(Path(f))
        images.append({"id": iid, "file_name": Path(f).name, "width": int(w), "height": int(h)})
        for cls, x, y, bw, bh in np.asarray(labels, dtype=np.float64).reshape(-1, 5).tolist():
            box = [(x - bw / 2) * w, (y - bh / 2) * h, bw * w, bh * h]
            annotations.append({"id": len(annotations) + 1, "image_id": iid, "category_id": class_map[int(cls)],
                                "bbox": [round(v, 3) for v in box], "area": round(box[2] * box[3], 3),
                                "iscrowd": 0})
    categories = [{"id": class_map[i], "name": str(n)} for i, n in sorted(names.items()) if i < len(class_map)]
    file = Path(file)
    with open(file, "w") as fh:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, fh)
    return file


def coco_eval(anno_json, pred_json, im_files):
    """Run pycocotools COCOeval (bbox) restricted to the evaluated images; prints its 12 statistics.

    Returns COCOeval.stats, or None (with a warning naming the cause) when the annotation file does not describe
    the evaluated images or pycocotools fails: val.py's own metrics then stand.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    try:
        anno = COCO(str(anno_json))
        ids = [image_id(Path(x)) for x in im_files]
        unknown = [i for i in ids if i not in anno.imgs]
        if unknown:
            LOGGER.warning(f"WARNING: {anno_json} has no image with id {unknown[0]!r} ({len(unknown)} of {len(ids)} "
                           f"evaluated images missing; image id = file stem as int); pycocotools evaluation skipped")
            return None
        pred = anno.loadRes(str(pred_json))
        ev = COCOeval(anno, pred, "bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    except Exception as e:  # pycocotools raises bare exceptions/assertions on malformed files
        LOGGER.warning(f"WARNING: pycocotools unable to run on {anno_json} ({type(e).__name__}: {e}); "
                       f"check that it is a COCO detection annotation file")
        return None
    return ev.stats

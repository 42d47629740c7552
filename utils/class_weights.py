"""Class-balance weights from dataset labels (for --image-weights sampling and model.class_weights)."""
import numpy as np
import torch


def labels_to_class_weights(labels, nc=80):
    """Inverse class frequency, normalised to sum 1; absent classes get the weight of a class seen once."""
    if not len(labels) or not any(len(x) for x in labels):
        return torch.ones(nc) / nc
    classes = np.concatenate([x[:, 0] for x in labels if len(x)]).astype(int)
    counts = np.bincount(classes, minlength=nc).astype(float)
    counts[counts == 0] = 1
    w = 1 / counts
    return torch.from_numpy(w / w.sum()).float()


def labels_to_image_weights(labels, nc=80, class_weights=np.ones(80)):
    """Per image: sum over its objects of their class weight (images of rare classes are drawn more)."""
    counts = np.zeros((len(labels), nc))
    for i, x in enumerate(labels):
        counts[i] = np.bincount(np.asarray(x)[:, 0].astype(int), minlength=nc)[:nc]
    return (np.asarray(class_weights[:nc]).reshape(1, nc) * counts).sum(1)

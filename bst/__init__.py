"""bst: project libraries that know nothing about YOLO (see bst/README.md)."""

"""The workflows that use a model: training (the epoch loop, QAT steps, AutoBatch, AutoAnchor, hyperparameter
evolution), running any exported file (DetectMultiBackend, torch.hub's AutoShape) and exporting (exporters/). Above
models/ and below the command-line scripts."""

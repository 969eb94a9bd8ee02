"""Classifies a dataset split's images with `pipeline("image-classification")` from an exported folder, as a user
would on another machine: run from outside the repository, with nothing of it importable.

    python classify_with_pipeline.py FOLDER DATASET_DIR SPLIT [--trust_remote_code]

Prints one JSON line: the class of the model that the pipeline loaded, and per image the label names in the
model's own order with their scores.
"""

import json
import sys

import datasets
from transformers import pipeline

folder, dataset_dir, split = sys.argv[1:4]
trust = "--trust_remote_code" in sys.argv
classify = pipeline("image-classification", model=folder, device="cpu", trust_remote_code=trust)
images = list(datasets.load_dataset(dataset_dir, split=split)["img"])
labels = [classify.model.config.id2label[i] for i in range(classify.model.config.num_labels)]
scores = []
for result in classify(images, top_k=len(labels)):
    by_label = {r["label"]: r["score"] for r in result}
    scores.append([by_label[label] for label in labels])
print(json.dumps({"model_class": f"{type(classify.model).__module__}.{type(classify.model).__name__}",
                  "labels": labels, "scores": scores}))

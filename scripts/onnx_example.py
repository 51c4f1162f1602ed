"""Classify images with a graph from metalab-export, using onnxruntime, numpy and PIL only (no metalab, no torch).

python onnx_example.py protonet.onnx my_classes/ new1.png new2.png   # episode graph: support folder given
python onnx_example.py maml_adapted.onnx new1.png new2.png           # adapted graph: classes in the file
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image


def prepare(paths, meta):
    """Images as the graph's float32 [N, C, H, W] input, following the transform in its metadata."""
    size, images = int(meta["image_size"]), []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert(meta["image_mode"]).resize((size, size), Image.Resampling.LANCZOS)
        array = np.asarray(image, dtype=np.uint8)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)  # [C, H, W]
        if json.loads(meta["invert"]):
            array = 255 - array
        images.append(array.astype(np.float32) / 255)
    return np.stack(images)


def main(model_path, *args):
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    if meta["graph"] == "episode":  # the first argument is a folder of class folders
        folders = sorted(p for p in Path(args[0]).iterdir() if p.is_dir())
        labels = [folder.name for folder in folders]
        files = [(f, k) for k, folder in enumerate(folders) for f in sorted(folder.iterdir()) if f.is_file()]
        onehot = np.eye(len(labels), dtype=np.float32)[[k for _, k in files]]
        inputs = {"support": prepare([f for f, _ in files], meta), "support_onehot": onehot}
        queries = args[1:]
    else:  # adapted to its classes already
        labels, queries, inputs = json.loads(meta["labels"]), args, {}
    inputs["query"] = prepare(queries, meta)
    logits = session.run(["logits"], inputs)[0]
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    for query, row in zip(queries, probabilities):
        print(json.dumps({"item": str(query), "label": labels[row.argmax()], "probability": float(row.max())}))


if __name__ == "__main__":
    main(*sys.argv[1:])

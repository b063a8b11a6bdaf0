"""Zero-shot classification accuracy on an ImageFolder-style directory (one sub-folder per class)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coca.errors import InvalidInputError
from coca.media import image_files
from coca.prompts import label_prompts


@dataclass
class ZeroShotReport:
    classes: list[str]
    confusion: np.ndarray  # (true, predicted) counts

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / max(self.confusion.sum(), 1))

    def summary(self) -> dict:
        return {"images": int(self.confusion.sum()), "classes": len(self.classes), "accuracy": self.accuracy}

    def format(self) -> str:
        width = max(len(c) for c in self.classes)
        lines = [f"accuracy {self.accuracy:.2%} on {int(self.confusion.sum())} images, {len(self.classes)} classes",
                 "confusion (rows: true class, columns: predicted, in class order)"]
        for name, row in zip(self.classes, self.confusion):
            lines.append(f"{name:>{width}}  " + " ".join(f"{n:4d}" for n in row))
        return "\n".join(lines)


def image_folder(directory: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    if not directory.is_dir():
        raise InvalidInputError(f"{directory}: not a directory")
    classes = sorted(d.name for d in directory.iterdir() if d.is_dir())
    samples = [(path, label) for label, name in enumerate(classes) for path in image_files(directory / name)]
    if len(classes) < 2 or not samples:
        raise InvalidInputError(f"{directory}: expected one sub-folder of images per class (at least two classes)")
    return classes, samples


def evaluate_folder(model, directory: Path, template: str, batch_size: int = 16) -> ZeroShotReport:
    classes, samples = image_folder(directory)
    text = model.embed_texts(label_prompts(template, [c.replace("_", " ") for c in classes]))
    images = model.embed_images([str(p) for p, _ in samples], batch_size=batch_size, progress=True)
    predicted = (images @ text.T).argmax(1)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for (_, truth), guess in zip(samples, predicted):
        confusion[truth, guess] += 1
    return ZeroShotReport(classes, confusion)

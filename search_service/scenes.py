"""Cutting a video into scenes from its sampled frames' embeddings (numpy only: the service holds no model).

A scene is a run of sampled frames. A new scene starts at a sampled frame whose ClassEmbedding's cosine
similarity to the previous sampled frame's is below `threshold` (a cut), once the current scene is at
least `min_scene_s` long; a scene that reaches `max_scene_s` ends there whatever the embeddings say, so
a video with no cut becomes fixed windows of `max_scene_s`. A scene runs from its first frame's time to
the next scene's first frame (the last one to the video's end). Its embedding is the normalised mean of
its frames' ClassEmbeddings; its caption input (when asked) the mean of their ImageEmbeddings, as the
model card captions a video; its keyframe the sampled frame nearest its middle.

Memory: sums, not frames. What a scene holds while open is its sums and one small JPEG per sampled frame
(at most max_scene_s / every_s of them) for the keyframe.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

MAX_SCENE_FRAMES_HELD = 4096  # keyframe candidates one scene holds (max_scene_s / every_s is checked against it)


@dataclass(frozen=True)
class SceneSettings:
    every_s: float = 0.5  # sample a frame this often (video seconds)
    threshold: float = 0.85  # cut where consecutive sampled frames' cosine similarity is below this
    min_scene_s: float = 1.0
    max_scene_s: float = 30.0

    def problem(self) -> Optional[str]:
        """What is wrong with these settings (None: nothing), naming the field."""
        if not 0.04 <= self.every_s <= 60:
            return f"every_s must be in [0.04, 60] seconds, got {self.every_s:g}"
        if not -1 <= self.threshold <= 1:
            return f"scene_threshold is a cosine similarity in [-1, 1], got {self.threshold:g}"
        if not 0 <= self.min_scene_s <= self.max_scene_s:
            return f"min_scene_s must be in [0, max_scene_s = {self.max_scene_s:g}], got {self.min_scene_s:g}"
        if not self.every_s <= self.max_scene_s <= 3600:
            return f"max_scene_s must be in [every_s = {self.every_s:g}, 3600], got {self.max_scene_s:g}"
        if self.max_scene_s / self.every_s > MAX_SCENE_FRAMES_HELD:
            return (f"max_scene_s / every_s = {self.max_scene_s / self.every_s:.0f} frames a scene, over "
                    f"{MAX_SCENE_FRAMES_HELD}")
        return None


@dataclass
class Scene:
    index: int
    start_s: float
    end_s: float
    frames: int  # sampled frames in it
    embedding: np.ndarray  # (D,) float32, unit norm
    keyframe: bytes  # JPEG
    image_embeddings: Optional[np.ndarray] = None  # (T, W) float32: the mean of its frames' (caption input)


@dataclass
class _Open:
    start_s: float
    class_sum: np.ndarray
    image_sum: Optional[np.ndarray]
    times: list[float] = field(default_factory=list)
    thumbnails: list[bytes] = field(default_factory=list)


class SceneCutter:
    """Feed sampled frames in time order (`add`), then `finish`; each returns the scenes it closed."""

    def __init__(self, settings: SceneSettings):
        self.settings = settings
        self.count = 0
        self._open: Optional[_Open] = None
        self._previous: Optional[np.ndarray] = None

    def add(self, time_s: float, class_embedding: np.ndarray, thumbnail: bytes,
            image_embeddings: Optional[np.ndarray] = None) -> list[Scene]:
        vector = np.asarray(class_embedding, np.float64)
        closed = []
        if self._open is not None and self._starts_scene(time_s, vector):
            closed.append(self._close(time_s))
        if self._open is None:
            self._open = _Open(time_s, np.zeros_like(vector),
                               None if image_embeddings is None else np.zeros(image_embeddings.shape, np.float64))
        scene = self._open
        scene.class_sum += vector
        if scene.image_sum is not None:
            scene.image_sum += image_embeddings
        scene.times.append(time_s)
        scene.thumbnails.append(thumbnail)
        self._previous = vector
        return closed

    def finish(self, end_s: float) -> list[Scene]:
        """The last scene, ending at `end_s` (the video's end)."""
        if self._open is None:
            return []
        return [self._close(max(end_s, self._open.times[-1]))]

    def _starts_scene(self, time_s: float, vector: np.ndarray) -> bool:
        length = time_s - self._open.start_s
        if length >= self.settings.max_scene_s - 1e-6:
            return True
        similarity = float(vector @ self._previous / (np.linalg.norm(vector) * np.linalg.norm(self._previous)))
        return similarity < self.settings.threshold and length >= self.settings.min_scene_s - 1e-6

    def _close(self, end_s: float) -> Scene:
        scene, self._open = self._open, None
        frames = len(scene.times)
        middle = (scene.start_s + end_s) / 2
        key = min(range(frames), key=lambda i: abs(scene.times[i] - middle))
        mean = scene.class_sum / frames
        image = None if scene.image_sum is None else (scene.image_sum / frames).astype(np.float32)
        closed = Scene(self.count, scene.start_s, end_s, frames, (mean / np.linalg.norm(mean)).astype(np.float32),
                       scene.thumbnails[key], image)
        self.count += 1
        return closed

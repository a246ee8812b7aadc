"""Monocular depth for depth-to-image when no depth map is given: transformers' DPT, run in PyTorch.

An optional extra (``pip install 'sdjax[depth]'``, which adds PyTorch): sdjax itself never imports
torch. The estimator is built from a hub id or folder and loads its weights on first use, so
attaching one to a model costs nothing until depth is actually estimated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

DEFAULT_DEPTH_MODEL = "Intel/dpt-hybrid-midas"
INSTALL_HINT = "pip install 'sdjax[depth]' (PyTorch and transformers)"


class DepthEstimator:
    """``estimator(images)`` -> one relative depth map (h, w) float32 per uint8 (H, W, 3) image,
    larger = nearer (MiDaS inverse depth), at the estimator's own resolution.

    ``model`` is a DPTForDepthEstimation folder or hub id; ``processor`` the DPTImageProcessor's
    (default: the same place). Stable Diffusion 2 depth repos keep them in the ``depth_estimator/``
    and ``feature_extractor/`` subfolders, which ``from_model_folder`` finds.
    """

    def __init__(self, model: str = DEFAULT_DEPTH_MODEL, processor: Optional[str] = None):
        self.model_source = str(model)
        self.processor_source = str(processor or model)
        self._model = None
        self._processor = None

    @classmethod
    def from_model_folder(cls, folder) -> Optional["DepthEstimator"]:
        """The estimator a diffusers depth-to-image folder ships with, or None if it has none."""
        folder = Path(folder)
        if not (folder / "depth_estimator" / "config.json").is_file():
            return None
        processor = folder / "feature_extractor"
        return cls(str(folder / "depth_estimator"), str(processor) if processor.is_dir() else None)

    def load(self) -> "DepthEstimator":
        if self._model is None:
            try:
                import torch  # noqa: F401  (transformers' DPT runs in PyTorch: fail here, clearly)
                from transformers import DPTForDepthEstimation, DPTImageProcessor
            except ImportError as e:
                raise ValueError(f"estimating depth needs PyTorch and transformers: {INSTALL_HINT} ({e})") from e
            self._processor = DPTImageProcessor.from_pretrained(self.processor_source)
            self._model = DPTForDepthEstimation.from_pretrained(self.model_source).eval()
        return self

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        import torch

        self.load()
        pixels = self._processor(images=list(np.asarray(images, np.uint8)), return_tensors="pt").pixel_values
        with torch.no_grad():
            depth = self._model(pixel_values=pixels.float()).predicted_depth
        return [d for d in depth.float().numpy()]

    def __repr__(self) -> str:
        return f"DepthEstimator(model={self.model_source!r}, processor={self.processor_source!r})"

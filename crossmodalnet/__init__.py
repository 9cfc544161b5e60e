"""CrossModalNet: 3D multimodal (CT + MR) whole-heart segmentation with a cross-modal transformer."""

__version__ = "0.1.0"

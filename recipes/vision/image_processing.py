"""The training data's preprocessing as a transformers image processor, saved beside every vision export.

It resizes to the training size, scales pixels to [0, 1] by the split's full intensity (255, or 16 for the digits'
0-16 levels) and normalises by the training split's mean and std, so `AutoImageProcessor.from_pretrained(folder)` and
`pipeline("image-classification", ...)` prepare new images exactly as the recipe's evaluation did.

Colour data gets transformers' own `ViTImageProcessor` (no remote code). Single-channel data gets
`GrayscaleImageProcessor`, which is copied beside the weights: `pipeline` turns every image into RGB before the
processor sees it, and a one-channel model needs it back in one channel.
"""

import numpy as np
import transformers
from PIL import Image

# The PIL flavour needs no torchvision (transformers 5 falls back to it anyway); it saves as ViTImageProcessor.
_BASE = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor

# ITU-R 601-2 luma, the weights of PIL's convert("L"): a grey image made RGB comes back unchanged.
_LUMA = np.array([0.299, 0.587, 0.114])


class GrayscaleImageProcessor(_BASE):
    """ViT's resize/rescale/normalise with every image reduced to one (luma) channel first."""

    def process_image(self, image, *args, **kwargs):
        if isinstance(image, Image.Image):
            return super().process_image(image.convert("L"), *args, **kwargs)
        image = super().process_image(image, *args, **kwargs)  # channels first from here
        if image.shape[0] == 3:
            luma = np.tensordot(_LUMA, image.astype(np.float64), axes=1)[None]
            image = np.rint(luma).astype(image.dtype) if np.issubdtype(image.dtype, np.integer) else \
                luma.astype(image.dtype)
        return image


GrayscaleImageProcessor.register_for_auto_class("AutoImageProcessor")


def image_processor(image_size: int, channels: int, scale: float, mean, std):
    """The processor for data of `image_size` squares with `channels` channels, full intensity `scale`, and the
    training split's per-channel `mean` and `std` (of pixels in [0, 1])."""
    kind = GrayscaleImageProcessor if channels == 1 else _BASE
    return kind(do_resize=True, size={"height": image_size, "width": image_size}, do_rescale=True,
                rescale_factor=1.0 / scale, do_normalize=True, image_mean=list(mean), image_std=list(std))

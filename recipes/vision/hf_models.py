"""The recipe's own CNNs (models.py) as transformers image classifiers, so that an export loads the Hugging Face way:

    AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
    pipeline("image-classification", model=folder, trust_remote_code=True)

Every save copies this file and models.py beside the weights (`auto_map` in config.json names them), so the folder
needs neither this repository nor its package. Importing this module also registers the classes with the Auto
classes, so with the package installed `trust_remote_code` is not needed.
"""

from typing import Optional

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import ImageClassifierOutput

from .image_processing import GrayscaleImageProcessor
from .models import MODEL_CLASSES, build_model

__all__ = ["SWACNNConfig", "SWACNNForImageClassification"]


class SWACNNConfig(PretrainedConfig):
    """Which of models.py's architectures, with what arguments; labels live in the usual `id2label`.

    Args:
        architecture: "small_cnn", "preresnet" or "wideresnet".
        num_channels: input image channels (1 for digits, 3 for CIFAR).
        architecture_args: the architecture's own arguments, e.g. {"depth": 164} or {"width": 32}.
    """

    model_type = "swa_cnn"

    def __init__(self, architecture: str = "small_cnn", num_channels: int = 3,
                 architecture_args: Optional[dict] = None, **kwargs) -> None:
        if architecture not in MODEL_CLASSES:
            raise ValueError(f"architecture: unknown {architecture!r}; choose one of {', '.join(sorted(MODEL_CLASSES))}")
        self.architecture = architecture
        self.num_channels = num_channels
        self.architecture_args = dict(architecture_args or {})
        super().__init__(**kwargs)


class SWACNNForImageClassification(PreTrainedModel):
    """One of models.py's networks behind transformers' image-classification interface."""

    config_class = SWACNNConfig
    base_model_prefix = "net"
    main_input_name = "pixel_values"

    def __init__(self, config: SWACNNConfig) -> None:
        super().__init__(config)
        self.net = build_model(config.architecture, num_classes=config.num_labels, in_channels=config.num_channels,
                               **config.architecture_args)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # The architectures initialise themselves (He-normal convs, BN at identity) in their constructors.
        pass

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None,
                return_dict: Optional[bool] = None, **kwargs) -> ImageClassifierOutput:
        logits = self.net(pixel_values)
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels)
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return ImageClassifierOutput(loss=loss, logits=logits)


SWACNNConfig.register_for_auto_class()
SWACNNForImageClassification.register_for_auto_class("AutoModelForImageClassification")
AutoConfig.register(SWACNNConfig.model_type, SWACNNConfig, exist_ok=True)
AutoModelForImageClassification.register(SWACNNConfig, SWACNNForImageClassification, exist_ok=True)
AutoImageProcessor.register(SWACNNConfig, GrayscaleImageProcessor, exist_ok=True)

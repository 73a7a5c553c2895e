"""maskrcnn: Mask R-CNN instance segmentation (FPN p2..p5, multi-level RPN), pure PyTorch."""

from ._version import __version__
from .config import Config, ConfigError
from .errors import DataError, UserError
from .modeling.model import MaskRCNN
from .structures import Detections, Detector, InstanceResult, Losses, ModelOutput, Proposals, Target

__all__ = ["Config", "ConfigError", "DataError", "UserError", "MaskRCNN", "ModelOutput", "Losses",
           "InstanceResult", "Target", "Proposals", "Detections", "Detector", "__version__"]

"""Grid attention gates and the Attention U-Net (Oktay et al., MIDL 2018) for PyTorch, 2D and 3D."""

from .blocks import ConvBlock, DeepSupervisionHead, GatingSignal, UpBlock, deep_supervision_weights
from .convert import load_oktay_state_dict
from .finetune import freeze_backbone, gate_parameters, unfreeze
from .functional import grid_attention
from .gates import GridAttentionGate, GridAttentionGate2D, GridAttentionGate3D, MultiAttentionGate
from .nets import AttentionUNet, AttentionUNet2D, AttentionUNet3D, UNet, UNet2D, UNet3D
from .ops import BackendUnavailableError, get_backend, use_backend
from .transfer import TransferReport, attention_unet_from_unet, checkpoint_config, init_passthrough, network_from_config

__version__ = "0.1.0"

__all__ = [
    "grid_attention",
    "GridAttentionGate",
    "GridAttentionGate2D",
    "GridAttentionGate3D",
    "MultiAttentionGate",
    "ConvBlock",
    "GatingSignal",
    "UpBlock",
    "DeepSupervisionHead",
    "deep_supervision_weights",
    "UNet",
    "UNet2D",
    "UNet3D",
    "AttentionUNet",
    "AttentionUNet2D",
    "AttentionUNet3D",
    "load_oktay_state_dict",
    "attention_unet_from_unet",
    "checkpoint_config",
    "network_from_config",
    "TransferReport",
    "init_passthrough",
    "gate_parameters",
    "freeze_backbone",
    "unfreeze",
    "use_backend",
    "get_backend",
    "BackendUnavailableError",
    "__version__",
]

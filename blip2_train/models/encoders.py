"""Frozen image encoders from open_clip, cut to their second-to-last block (docs/blip2_numerics.md s.1).

- ``eva``: open_clip ``EVA01-g-14`` (a timm ``eva_giant_patch14_224`` trunk, width 1408, 40 blocks):
  39 blocks kept, no final norm, all 257 tokens at 224 px (677 at 364 px).
- ``clip``: open_clip ``ViT-L-14`` with OpenAI weights (QuickGELU), 23 of 24 blocks, ``ln_pre``
  applied (it belongs to CLIP), no ``ln_post`` and no projection.
- ``tiny_eva`` / ``tiny_clip``: the same code paths at width 64, 4 blocks, 64 px (65 tokens), from the
  local open_clip configs in ``open_clip_configs/``; the tiny EVA is a timm ``Eva`` trunk registered
  as ``blip2_tiny_eva_patch8_64``.

Precision (``encoder.precision``): the Linear / Conv / attention-projection weights (>99% of the
parameters) are stored in fp16 or bf16 and run under autocast; LayerNorms, embeddings and the
residual stream stay fp32, as in LAVIS's EVA (``convert_weights_to_fp16`` + autocast). The tokens
come back in fp32 whatever the precision. fp16 runs on CPU too (slowly); prefer bf16 or fp32 there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
from open_clip.factory import load_state_dict
from timm.layers import resample_abs_pos_embed
from timm.models import build_model_with_cfg, register_model
from timm.models.eva import Eva
from torch import nn

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's own names


@register_model
def blip2_tiny_eva_patch8_64(pretrained: bool = False, **kwargs) -> Eva:
    """A tiny timm EVA trunk (width 64, 4 blocks, 4 heads, patch 8, 64 px): ``eva`` at test size."""
    if pretrained:
        raise ValueError("blip2_tiny_eva_patch8_64 has no pretrained weights; it is randomly initialised")
    args = {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0}
    kwargs.pop("pretrained_cfg", None)
    return build_model_with_cfg(Eva, "blip2_tiny_eva_patch8_64", pretrained=False,
                                pretrained_cfg={"input_size": (3, 64, 64), "num_classes": 0},
                                **{**args, **kwargs})


# The tiny architectures as open_clip model configs (blip2-tiny-eva, blip2-tiny-clip).
open_clip.add_model_config(Path(__file__).parent / "open_clip_configs")


# ----------------------------------------------------------------------------------------- weights
def _tag_source(cfg) -> dict:
    """open_clip's pretrained config for ``cfg.pretrained`` as a tag of ``cfg.model_name``."""
    source = open_clip.get_pretrained_cfg(cfg.model_name, cfg.pretrained)
    if not source:
        tags = open_clip.list_pretrained_tags_by_model(cfg.model_name)
        raise ValueError(f"encoder.pretrained={cfg.pretrained!r} is neither an existing file nor an "
                         f"open_clip tag of {cfg.model_name}; valid tags: {', '.join(tags) or 'none'}. "
                         f"Pass a local weights file or encoder.pretrained=null for random init")
    return source


def _is_tag(value) -> bool:
    """An open_clip tag such as ``openai``, as opposed to a path (existing or not)."""
    value = str(value)
    return not (os.path.exists(value) or os.sep in value or "/" in value
                or value.endswith((".bin", ".pt", ".pth", ".safetensors")))


def _hub_repo_and_files(source: dict) -> tuple[str, tuple[str, ...]]:
    """open_clip's ``hf_hub`` entry: ``'org/name/'`` means its default files, ``'org/name/f.bin'`` f."""
    repo, filename = os.path.split(source.get("hf_hub") or "")
    return repo, (filename,) if filename else HUB_FILES


def _weights_error(cfg, reason: str) -> RuntimeError:
    source = open_clip.get_pretrained_cfg(cfg.model_name, cfg.pretrained) or {}
    repo, files = _hub_repo_and_files(source)
    where = (f"{' or '.join(files)} from the Hugging Face hub repo {repo} (https://huggingface.co/{repo})"
             if repo else f"the file at {source.get('url') or '(no known source)'}")
    if repo and source.get("url"):
        where += f", or the original file {source['url']}"
    return RuntimeError(
        f"encoder={cfg.name}: {cfg.model_name} weights (open_clip tag {cfg.pretrained}) could not be "
        f"loaded: {reason}. "
        f"Download {where} on a machine with internet, copy it here and pass "
        f"encoder.pretrained=/path/to/that/file (or put it in the Hugging Face cache, HF_HOME). "
        f"Random weights are never used silently: encoder.pretrained=null asks for them explicitly.")


def _cached_hub_file(source: dict) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    repo, files = _hub_repo_and_files(source)
    for filename in files if repo else ():
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):  # a miss is None or a "known missing" sentinel
            return path
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can a TCP connection to the hub (or to the configured proxy) be made within seconds?

    huggingface_hub retries a dead network for about 25 s per file; this answers in at most
    ``timeout`` seconds, so a machine without internet fails at once with instructions."""
    from huggingface_hub import constants

    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), None)
    url = urlparse(proxy or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return flag or bool(constants.HF_HUB_OFFLINE)


def resolve_weights(cfg) -> str | None:
    """The local file behind ``encoder.pretrained``: a path, or an open_clip tag found in the hub
    cache or downloaded. Runs before the model is built, so missing weights fail in seconds."""
    pretrained = cfg.pretrained
    if not pretrained:
        return None
    pretrained = str(pretrained)
    if os.path.isdir(pretrained):
        found = [Path(pretrained, f) for f in HUB_FILES if Path(pretrained, f).is_file()]
        if not found:
            raise RuntimeError(f"encoder.pretrained={pretrained} is a directory without "
                               f"{' or '.join(HUB_FILES)}; pass the weights file itself")
        return str(found[0])
    if os.path.isfile(pretrained):
        return pretrained
    if not _is_tag(pretrained):
        raise RuntimeError(f"encoder.pretrained={pretrained}: no such file (expected {cfg.model_name} "
                           f"weights: an open_clip checkpoint, .bin/.pt/.safetensors)")
    source = _tag_source(cfg)
    cached = _cached_hub_file(source)
    if cached:
        return cached
    if _hub_offline():
        raise _weights_error(cfg, "HF_HUB_OFFLINE is set and the file is not in the Hugging Face cache")
    if not _hub_reachable():
        raise _weights_error(cfg, "the Hugging Face hub cannot be reached from this machine")
    try:
        return open_clip.download_pretrained(source)
    except Exception as err:  # hub errors come in many types
        raise _weights_error(cfg, f"{type(err).__name__}: {str(err)[:300]}") from err


def _read_state_dict(path: str) -> dict:
    """open_clip checkpoint (.bin/.pt/.safetensors, optional 'state_dict'/'module.' wrapping), or an
    OpenAI TorchScript archive such as the original ViT-L-14.pt."""
    try:
        return load_state_dict(path, weights_only=True)
    except RuntimeError as err:
        if "TorchScript" not in str(err):
            raise
    return dict(torch.jit.load(path, map_location="cpu").state_dict())


def load_visual_weights(visual: nn.Module, path: str, cfg) -> None:
    """Load the image tower of the checkpoint at ``path`` strictly into ``visual`` (open_clip's visual
    tower). Accepts a full open_clip checkpoint (``visual.*`` keys), a visual-tower state dict, or a
    timm trunk state dict (its classifier head ignored). A mismatch raises instead of leaving
    random weights behind."""
    try:
        state = _read_state_dict(path)
    except Exception as err:
        raise RuntimeError(f"encoder.pretrained={path} could not be read as {cfg.model_name} weights "
                           f"({type(err).__name__}: {str(err)[:300]})") from err
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    target = visual
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and not any(k.startswith("trunk.") for k in state):  # a timm checkpoint
        trunk.head = nn.Identity()  # its classifier (if any) is not open_clip's, and is cut anyway
        target, state = trunk, {k: v for k, v in state.items() if not k.startswith("head.")}
    expected = set(target.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise RuntimeError(
            f"encoder.pretrained={path} does not hold {cfg.model_name} image-tower weights: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]}). Pass the open_clip checkpoint of {cfg.model_name}")
    target.load_state_dict(state, strict=True, assign=True)  # assign: replaces the meta parameters
    log.info("%s: loaded image-tower weights from %s", cfg.model_name, path)


# ---------------------------------------------------------------------------------------- building
@contextlib.contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device (no memory, no random init) while buffers stay real:
    some buffers are not in checkpoints (timm EVA's zero ``k_bias``). Weights are then assigned
    from the checkpoint. Not thread-safe: it patches ``nn.Module.register_parameter``."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


class _DropMessage(logging.Filter):
    """Hides open_clip's 'initialized randomly' warning: weights are loaded after construction."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _uses_quick_gelu(cfg) -> bool:
    """OpenAI's CLIP was trained with QuickGELU; open_clip only knows it from the tag's config.
    A local file or random init under ``encoder=clip`` (the OpenAI ViT-L/14 preset) keeps it too."""
    if cfg.pretrained and _is_tag(cfg.pretrained):
        return bool(_tag_source(cfg).get("quick_gelu", False))
    return cfg.name == "clip"


def _create_visual(cfg, device: str) -> nn.Module:
    """open_clip's image tower for ``cfg`` (its text tower is built beside it and dropped): parameters on
    the meta device when weights will be loaded, else initialised on ``device`` (its generator's seed)."""
    quick_gelu = _uses_quick_gelu(cfg)
    weights = None if device == "meta" else resolve_weights(cfg)
    if weights:
        context = _parameters_on_meta()
    else:  # meta, or random init right where the encoder runs (a 1B-parameter ViT: seconds on a GPU)
        context = torch.device(device)
    # device=None: open_clip's final .to() must not try to copy meta parameters.
    target = None if weights else device
    root, drop = logging.getLogger(), _DropMessage()
    root.addFilter(drop)
    try:
        with context:
            model = open_clip.create_model(cfg.model_name, pretrained=None, force_quick_gelu=quick_gelu,
                                           device=target)
    finally:
        root.removeFilter(drop)
    visual = model.visual
    _check_against(cfg, visual)  # before reading gigabytes of weights
    if weights:
        load_visual_weights(visual, weights, cfg)
        left = [name for name, p in visual.named_parameters() if p.is_meta]
        if left:
            raise RuntimeError(f"{cfg.model_name}: parameters without weights after loading: {left[:3]}")
    elif device != "meta":
        log.warning("encoder=%s (%s): random init (encoder.pretrained=null)", cfg.name, cfg.model_name)
    return visual


def _resample_positions(pos: torch.Tensor, new: tuple, old: tuple, prefix: int) -> torch.Tensor:
    """Bicubic, align_corners=False, no antialias: LAVIS's ``interpolate_pos_embed`` (timm's default
    antialiased kernel gives other values). [1, prefix + old grid, W] -> [1, prefix + new grid, W]."""
    return resample_abs_pos_embed(pos.detach(), new_size=list(new), old_size=list(old),
                                  num_prefix_tokens=prefix, interpolation="bicubic", antialias=False,
                                  align_corners=False)


def _resize_eva(vit: Eva, image_size: int) -> None:
    old, pos = vit.patch_embed.grid_size, vit.pos_embed
    vit.set_input_size(img_size=(image_size, image_size))  # patch grid and timm's own bookkeeping
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    vit.pos_embed = nn.Parameter(_resample_positions(pos, vit.patch_embed.grid_size, old, prefix))


def _resize_clip(visual: nn.Module, image_size: int) -> None:
    grid = (image_size // visual.patch_size[0],) * 2
    pos = visual.positional_embedding  # [1 + g*g, W]
    visual.positional_embedding = nn.Parameter(_resample_positions(pos[None], grid, visual.grid_size, 1)[0])
    visual.grid_size, visual.image_size = grid, (image_size, image_size)


def _set_precision(vit: nn.Module, dtype: torch.dtype) -> None:
    """Matmul weights (Linear, Conv, attention in-projections) -> ``dtype``; everything else fp32."""
    low = set()
    for module in vit.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            low.update(id(p) for p in module.parameters(recurse=False))
        elif isinstance(module, nn.MultiheadAttention):
            low.update(id(p) for p in (module.in_proj_weight, module.in_proj_bias) if p is not None)
    for p in vit.parameters():
        p.data = p.data.to(dtype if id(p) in low else torch.float32)
    for module in vit.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point():
                module._buffers[name] = buf.float()


class FrozenImageEncoder(nn.Module):
    """Image -> tokens of the kept blocks (all tokens, CLS included, no final norm): [B, N, W] fp32.

    Attributes: ``width`` (W), ``num_tokens`` (N), ``image_size``, ``depth`` (blocks kept),
    ``kind`` ('eva' for a timm trunk, 'clip' for open_clip's ViT), ``precision``, ``frozen``, ``vit``.
    Frozen (``freeze=True``): no trainable parameters, eval mode that ``train()`` cannot undo, forward
    under ``no_grad``. Otherwise (fine-tuning) it trains like any module, in fp32 weights.
    """

    def __init__(self, visual: nn.Module, image_size: int, drop_last_blocks: int = 1,
                 precision: str = "fp32", freeze: bool = True, gradient_checkpointing: bool = False):
        super().__init__()
        self.kind = "eva" if hasattr(visual, "trunk") else "clip"
        self.image_size = int(image_size)
        if self.kind == "eva":
            vit = visual.trunk
            if self.image_size != vit.patch_embed.img_size[0]:
                _resize_eva(vit, self.image_size)
            vit.blocks = _keep_blocks(vit.blocks, drop_last_blocks)
            vit.norm = vit.fc_norm = vit.head_drop = vit.head = nn.Identity()  # tokens before any norm
            grid, prefix = vit.patch_embed.grid_size, vit.num_prefix_tokens
            self.width = vit.embed_dim
        else:
            vit = visual
            if self.image_size != vit.image_size[0]:
                _resize_clip(vit, self.image_size)
            vit.transformer.resblocks = _keep_blocks(vit.transformer.resblocks, drop_last_blocks)
            vit.ln_post, vit.proj = nn.Identity(), None
            grid, prefix = vit.grid_size, 1
            self.width = vit.transformer.width
        self.vit = vit
        self.depth = len(vit.blocks if self.kind == "eva" else vit.transformer.resblocks)
        self.num_tokens = grid[0] * grid[1] + prefix
        self.precision = precision
        self.compute_dtype = DTYPES[precision]
        self.frozen = bool(freeze)
        _set_precision(vit, self.compute_dtype)
        if self.frozen:
            vit.requires_grad_(False)
            self.eval()
        if gradient_checkpointing:
            if self.frozen:
                raise ValueError("encoder.gradient_checkpointing=true needs encoder.freeze=false: a frozen "
                                 "encoder runs under no_grad and keeps no activations to recompute")
            # timm's Eva and open_clip's VisionTransformer both recompute their blocks in backward
            (vit if self.kind == "eva" else visual).set_grad_checkpointing(True)
        self.gradient_checkpointing = bool(gradient_checkpointing)

    def fit_positions(self, state: dict, prefix: str = "encoder.") -> dict:
        """``state`` with a position embedding of another image size resampled to this encoder's grid
        (bicubic, as :func:`_resample_positions`): a ViT fine-tuned at 224 px initialises one at 364 px,
        as LAVIS's ``interpolate_pos_embed`` does on load. Other tensors are left as they are."""
        if self.kind == "eva":
            key, num_prefix = prefix + "vit.pos_embed", 0 if self.vit.no_embed_class else self.vit.num_prefix_tokens
            target = self.vit.pos_embed
        else:
            key, num_prefix, target = prefix + "vit.positional_embedding", 1, self.vit.positional_embedding
        value = state.get(key)
        if value is None or value.shape == target.shape or value.shape[-1] != target.shape[-1]:
            return state
        old = round((value.shape[-2] - num_prefix) ** 0.5)
        if old * old + num_prefix != value.shape[-2]:
            return state  # not a square grid: left for the report's shape mismatch
        grid = round((self.num_tokens - num_prefix) ** 0.5)
        resized = _resample_positions(value.float().reshape(1, -1, value.shape[-1]), (grid, grid), (old, old),
                                      num_prefix)  # [1, prefix + grid^2, W]
        log.info("%s: position embedding resampled from a %dx%d grid to %dx%d", key, old, old, grid, grid)
        return {**state, key: resized.reshape(target.shape).to(value.dtype)}

    def layer_index(self, name: str) -> int:
        """LAVIS's layer number of parameter ``name`` (relative to this module, e.g. ``vit.blocks.3.mlp.fc1.weight``),
        for layer-wise learning-rate decay: 0 for the patch, class and position embeddings (and CLIP's
        ``ln_pre``, which acts on them), ``i + 1`` for block ``i``, ``depth`` for anything else."""
        name = name.removeprefix("vit.")
        blocks = "blocks." if self.kind == "eva" else "transformer.resblocks."
        if name.startswith(blocks):
            return int(name[len(blocks):].split(".", 1)[0]) + 1
        embeddings = (("cls_token", "reg_token", "pos_embed", "patch_embed.") if self.kind == "eva" else
                      ("class_embedding", "positional_embedding", "conv1.", "ln_pre."))
        if name.startswith(embeddings):
            return 0
        return self.depth

    def train(self, mode: bool = True):
        """A frozen encoder stays in eval mode whatever is asked (no dropout or drop-path)."""
        super().train(mode and not self.frozen)
        return self

    def _clip_tokens(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.conv1(images).flatten(2).transpose(1, 2).float()  # [B, g*g, W]; fp32 residual stream
        cls = vit.class_embedding.float().expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1) + vit.positional_embedding.float()  # [B, 1 + g*g, W]
        x = vit.ln_pre(vit.patch_dropout(x))
        return vit.transformer(x)

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if self.compute_dtype == torch.float32:
            # A frozen fp32 ViT runs in fp32 even inside a mixed-precision trainer; a fine-tuned one
            # follows the trainer's autocast like the rest of the model.
            context = (torch.autocast(images.device.type, enabled=False) if self.frozen
                       else contextlib.nullcontext())
        else:
            context = torch.autocast(images.device.type, dtype=self.compute_dtype)
        with context:
            x = self.vit.forward_features(images) if self.kind == "eva" else self._clip_tokens(images)
        return x.float()  # [B, N, W]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, N, W] fp32 (detached when frozen)."""
        if not self.frozen:
            return self._tokens(images)
        with torch.no_grad():
            return self._tokens(images).detach()

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, depth={self.depth}, tokens={self.num_tokens}, width={self.width}, "
                f"precision={self.precision}, frozen={self.frozen}")


def _keep_blocks(blocks: nn.Module, drop_last: int) -> nn.Module:
    return blocks[: len(blocks) - drop_last] if drop_last else blocks


def _check(cfg) -> None:
    if cfg.model_name not in open_clip.list_models():
        raise ValueError(f"encoder.model_name={cfg.model_name!r} is not an open_clip model; see "
                         f"open_clip.list_models() or add a JSON config to "
                         f"{Path(__file__).parent / 'open_clip_configs'}")
    if cfg.precision not in DTYPES:
        raise ValueError(f"encoder.precision={cfg.precision!r}; choose one of: {', '.join(DTYPES)}")
    if not cfg.freeze and cfg.precision != "fp32":
        raise ValueError(f"encoder.freeze=false trains the ViT, which needs fp32 weights: set "
                         f"encoder.precision=fp32 (got {cfg.precision}) and use trainer.precision for "
                         f"mixed precision")


def _check_against(cfg, visual: nn.Module) -> None:
    """Checks that need the architecture: block count and patch size."""
    trunk = getattr(visual, "trunk", None)
    depth = len(trunk.blocks) if trunk is not None else len(visual.transformer.resblocks)
    patch = trunk.patch_embed.patch_size[0] if trunk is not None else visual.patch_size[0]
    if not 0 <= cfg.drop_last_blocks < depth:
        raise ValueError(f"encoder.drop_last_blocks={cfg.drop_last_blocks} must be in [0, {depth}) for "
                         f"{cfg.model_name} ({depth} blocks)")
    if cfg.image_size % patch:
        raise ValueError(f"encoder.image_size={cfg.image_size} is not a multiple of the patch size {patch} "
                         f"of {cfg.model_name}")


def build_image_encoder(cfg, device: str | torch.device = "cpu") -> FrozenImageEncoder:
    """Build the encoder described by ``cfg`` (EncoderConfig fields; a dataclass or OmegaConf node).

    Weights come from ``cfg.pretrained`` (an open_clip tag or a local file) or, when it is null, from a
    seeded random init. ``device="meta"`` builds the real architecture without memory or weights
    (shapes, tests); any other device receives the built encoder."""
    _check(cfg)
    meta = str(device) == "meta"
    visual = _create_visual(cfg, str(device))
    encoder = FrozenImageEncoder(visual, cfg.image_size, cfg.drop_last_blocks, cfg.precision, cfg.freeze,
                                 bool(getattr(cfg, "gradient_checkpointing", False)))
    return encoder if meta or str(device) == "cpu" else encoder.to(device)

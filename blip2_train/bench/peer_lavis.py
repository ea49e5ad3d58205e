"""LAVIS's own stage-1 step, timed by ``blip2_train.bench`` beside ours (``--impl ...,lavis``).

The issue's peer figure (22.0 s per B=16 step on a Zen 5 machine) cannot be compared with a
figure of another machine, so the benchmark runs LAVIS's code here, under the same harness:
``Blip2Qformer.forward`` of ``salesforce-lavis`` 1.0.2 with its ``Qformer.py`` (BERT-base with
cross-attention every 2nd layer, 32 queries), the frozen ViT replaced by the image tokens
[B, 257, 1408] (identity, as our step is fed), its tokenizer by the same fixed ids as our step
(length 32, no padding, [DEC] = the last id), our AdamW settings.

Only LAVIS's Q-Former files are needed; its package pins old dependencies, so the wheel is not
installed: ``pip download --no-deps`` fetches it into ``.cache/lavis`` and the Q-Former files
are read from there. Three transformers 4.x helpers that 5.x dropped are supplied
(``init_weights`` with the LM head tied to the word embeddings, ``invert_attention_mask``,
``get_head_mask``) and the LAVIS modules that pull in its other dependencies (ViTs, registry,
logging) are stubbed: nothing of them runs in the step. Its gathers are one process's
(identity, as LAVIS's own return with one rank), so no process group is created.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import torch
from torch import nn

LAVIS_WHEEL = "salesforce-lavis==1.0.2"
CACHE = Path(os.environ.get("BLIP2_LAVIS_CACHE", ".cache/lavis"))
FILES = ("lavis/models/blip2_models/Qformer.py", "lavis/models/blip2_models/blip2_qformer.py",
         "lavis/models/blip2_models/blip2.py", "lavis/models/blip_models/blip_outputs.py")


class LavisUnavailable(RuntimeError):
    pass


def fetch_sources(cache: Path = CACHE) -> Path:
    """The directory holding LAVIS's Q-Former files; downloads the wheel (no dependencies) once."""
    if all((cache / name).exists() for name in FILES):
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", LAVIS_WHEEL,
                          "-d", str(cache)], capture_output=True, text=True, check=False)
    wheels = sorted(cache.glob("salesforce_lavis-*.whl"))
    if out.returncode != 0 or not wheels:
        raise LavisUnavailable(
            f"could not download {LAVIS_WHEEL} ({out.stderr.strip().splitlines()[-1:] or 'no wheel'}); "
            f"download its wheel elsewhere (`pip download --no-deps {LAVIS_WHEEL}`) into {cache}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        for name in FILES:
            wheel.extract(name, cache)
    return cache


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


@functools.cache
def import_lavis(cache: Path = CACHE):
    """LAVIS's ``Blip2Qformer`` and ``BertLMHeadModel`` / ``BertConfig``, importable under transformers 5."""
    root = fetch_sources(cache).resolve()
    from transformers import modeling_utils, pytorch_utils

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
    if not hasattr(modeling_utils, "find_pruneable_heads_and_indices"):  # head pruning: never called
        modeling_utils.find_pruneable_heads_and_indices = None

    class Registry:
        def register_model(self, name):
            return lambda cls: cls

    for package in ("lavis", "lavis.common", "lavis.models", "lavis.models.blip_models",
                    "lavis.models.blip2_models"):
        _stub(package).__path__ = [str(root / package.replace(".", "/"))]
    _stub("lavis.common.registry", registry=Registry())
    _stub("lavis.common.dist_utils", download_cached_file=None, is_dist_avail_and_initialized=lambda: False)
    _stub("lavis.common.utils", get_abs_path=None, is_url=None)
    _stub("lavis.common.logger", MetricLogger=None)
    _stub("lavis.models.eva_vit", create_eva_vit_g=None)
    _stub("lavis.models.clip_vit", create_clip_vit_L=None)

    class BaseModel(nn.Module):
        @property
        def device(self):
            return next(self.parameters()).device

    # one process: LAVIS's gathers return their input (what its own do when the world size is 1)
    _stub("lavis.models.base_model", BaseModel=BaseModel, all_gather_with_grad=lambda x: x,
          concat_all_gather=lambda x: x)
    from lavis.models.blip2_models import Qformer, blip2_qformer
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    blip2_qformer.dist = types.SimpleNamespace(get_rank=lambda: 0)  # its forward's rank

    def init_weights(self):  # transformers 4.x: initialise every module, tie the LM head
        self.apply(self._init_weights)
        if hasattr(self, "cls"):
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def invert_attention_mask(self, mask):  # transformers 4.x's ModuleUtilsMixin method
        mask = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
        mask = mask.to(dtype=self.dtype)
        return (1.0 - mask) * torch.finfo(self.dtype).min

    Qformer.BertPreTrainedModel.init_weights = init_weights
    Qformer.BertPreTrainedModel.invert_attention_mask = invert_attention_mask
    Qformer.BertPreTrainedModel.get_head_mask = lambda self, head_mask, layers, *args: [None] * layers
    return Blip2Qformer, Qformer.BertLMHeadModel, Qformer.BertConfig


class _Tokens:
    def __init__(self, ids: torch.Tensor):
        self.input_ids, self.attention_mask = ids, torch.ones_like(ids)

    def to(self, device):
        return _Tokens(self.input_ids.to(device))


class _Tokenizer:
    """Returns the bench's fixed ids whatever the text (tokenizing is not what is compared)."""

    pad_token_id = 0

    def __init__(self, ids: torch.Tensor, bos_token_id: int):
        self.ids, self.bos_token_id = ids, bos_token_id

    def __call__(self, text, **kwargs) -> _Tokens:
        return _Tokens(self.ids)


def build(spec: dict, sizes: dict, ids: torch.Tensor):
    """LAVIS's ``Blip2Qformer`` (its ``__init__`` loads a ViT and BERT weights: assembled here as
    it assembles itself, with random BERT weights), its tokenizer returning ``ids`` [B, T]."""
    Blip2Qformer, BertLMHeadModel, BertConfig = import_lavis()
    config = BertConfig(vocab_size=spec["vocab"], **sizes)  # bert-base-uncased + [DEC]
    config.encoder_width, config.add_cross_attention = spec["width"], True
    config.cross_attention_freq, config.query_length = 2, sizes.get("num_query_tokens", 32)
    torch.manual_seed(0)
    model = Blip2Qformer.__new__(Blip2Qformer)
    nn.Module.__init__(model)
    model.Qformer = BertLMHeadModel(config)
    state = model.Qformer.state_dict()
    with torch.no_grad():  # the query FFNs start as copies of the text FFNs, as LAVIS does
        for name, param in model.Qformer.named_parameters():
            if "_query" in name:
                param.copy_(state[name.replace("_query", "")])
    queries = config.query_length
    model.query_tokens = nn.Parameter(torch.empty(1, queries, config.hidden_size).normal_(
        std=config.initializer_range))
    model.visual_encoder = nn.Identity()  # image tokens are fed directly: the frozen ViT is not timed
    model.ln_vision = nn.LayerNorm(spec["width"])
    model.vision_proj = nn.Linear(config.hidden_size, 256)
    model.text_proj = nn.Linear(config.hidden_size, 256)
    model.itm_head = nn.Linear(config.hidden_size, 2)
    model.temp = nn.Parameter(0.07 * torch.ones([]))
    model.max_txt_len = ids.shape[1]
    model.tokenizer = _Tokenizer(ids, bos_token_id=spec["vocab"] - 1)  # [DEC] = our dec_token_id
    return model.train()

"""trainer=fsdp: FSDP2 (``fully_shard``) through Lightning's ``ModelParallelStrategy``.

Units (each a group of parameters gathered together, sharded over every rank):
- one per block of the image encoder, of the Q-Former and of the LLM;
- the Q-Former's other trainable parameters (query tokens, ln_vision, text embeddings, ITC
  projections, ITM and LM heads, temperature) together, in the unit of the ``QFormer`` module;
- ``language_projection`` (stage 2, Q-Former bridge), or the whole MLP bridge (``bridge=mlp|pool_mlp``,
  which has no Q-Former);
- the frozen encoder's and the frozen LLM's other parameters (patch/position/token embeddings,
  final norms, the LM head tied to the token embeddings), each in the unit of its wrapper module.

Frozen and trainable parameters never share a unit: a frozen unit has nothing to reduce, and
trainable units hold fp32 parameters only. Frozen units keep their stored dtypes (the ViT's
fp16/bf16 matmul weights beside fp32 norms; the LLM's bf16).

Trainable units are used several times per step (each Q-Former layer by the text, ITG and ITM
passes and by ``cross_key_value``; the QFormer unit by every method). FSDP2 reshards a unit in
backward as soon as the input gradient of *one* use is done, while another use's backward may still
need the parameters (on CPU a segfault, on GPU garbage). So trainable units do not reshard in
backward (``set_reshard_after_backward(False)``); :func:`reshard_trainable` reshards them once the
whole backward is done (``on_after_backward``). Gradients are still reduce-scattered during backward;
a unit's peak is its full fp32 parameters from its first backward use to the end of backward, which
for the Q-Former (about 5% of a BLIP-2's parameters) is small. The frozen blocks are used once.

FSDP2 gathers a unit's parameters around its ``forward()``. Our modules are also driven through
other methods (``QFormer.query_forward``, ``itm_logits``, ..., each layer's ``cross_key_value``,
``FrozenLLM.embed`` / ``generate``): those are registered with ``register_fsdp_forward_method``.

Precision: trainable units gather and reduce in fp32 (``MixedPrecisionPolicy(param_dtype=fp32,
reduce_dtype=fp32)``); on GPU the compute runs under Lightning's ``bf16-mixed`` autocast exactly as
with one device or DDP, so the three give the same numerics. On CPU everything is fp32.
"""

from __future__ import annotations

import warnings

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

#: The QFormer methods the training and evaluation code calls (each gathers the root unit).
QFORMER_METHODS = ("encode_image", "image_states", "cross_attention_kv", "query_forward", "text_forward",
                   "joint_forward", "image_features", "text_features", "itm_logits", "lm_logits",
                   "current_temperature")
#: ModuleList names that hold transformer blocks: timm/open_clip ViTs, BERT, OPT, T5.
BLOCK_LISTS = ("blocks", "resblocks", "layer", "layers", "block")


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with one data-parallel mesh dimension over every rank (no tensor
    parallelism): ``device_mesh["data_parallel"]`` spans all devices of all nodes."""

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        """Resume as data only: a sharded directory's meta.pt, .metadata and every non-tensor shard entry
        are checked first (``interop.state_dict.verify_sharded_checkpoint``), and torch's distributed reader
        runs with safe reads; a single file is read with ``weights_only=True`` and the allow-list."""
        from pathlib import Path

        from blip2_train.interop.state_dict import (
            CHECKPOINT_SAFE_GLOBALS,
            UnsafeCheckpointError,
            _refusal,
            safe_dcp_reads,
            verify_sharded_checkpoint,
        )

        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            verify_sharded_checkpoint(path)
        try:
            with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS), safe_dcp_reads():
                return super().load_checkpoint(path, weights_only=True)
        except UnsafeCheckpointError:
            raise
        except Exception as err:
            if "Weights only load failed" in str(err) or "Unsupported global" in str(err):
                raise _refusal(path, err) from err
            raise


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks of the outermost ``nn.ModuleList`` s named like a block list under ``module`` (not
    the lists inside a block, such as T5's ``block.N.layer``), in order."""
    blocks, found = [], []
    for name, child in module.named_modules():
        if any(name.startswith(prefix + ".") for prefix in found):
            continue
        if isinstance(child, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS:
            found.append(name)
            blocks.extend(child)
    return blocks


def _policies():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    trainable = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                     cast_forward_inputs=False)
    frozen = MixedPrecisionPolicy(cast_forward_inputs=False)  # stored dtypes, nothing to reduce
    return trainable, frozen


def _is_frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


# FSDP2 warns for every unit output that is a view (the Q-Former's K/V heads, the temperature): an
# in-place op on one would skip a gather. No such op follows; tests/e2e/test_fsdp.py checks the gradients.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def shard_blip2(module: nn.Module, mesh) -> list[nn.Module]:
    """Apply ``fully_shard`` to a Stage1Module / Stage2Module, bottom-up (see the module docstring).
    Returns the trainable units, for :func:`reshard_trainable`."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    trainable, frozen = _policies()

    def shard(part: nn.Module, root: bool = False) -> None:
        policy = frozen if _is_frozen(part) else trainable
        # a frozen root is never in backward, which is where FSDP reshards a root: reshard it now
        reshard = True if root and policy is frozen else None
        fully_shard(part, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        if policy is trainable:
            part.set_reshard_after_backward(False)
            units.append(part)

    units: list[nn.Module] = []

    # frozen image encoder (or a fine-tuned one: then its units are trainable)
    for block in transformer_blocks(module.encoder):
        shard(block)
    shard(module.encoder, root=True)

    # Q-Former: its layers, then everything else it holds (stage 2 with an MLP bridge has none)
    qformer = module.model
    if qformer is not None:
        for layer in transformer_blocks(qformer.qformer):
            shard(layer)
            if hasattr(layer, "cross_key_value"):
                register_fsdp_forward_method(layer, "cross_key_value")
        shard(qformer, root=True)
        for method in QFORMER_METHODS:
            register_fsdp_forward_method(qformer, method)

    if hasattr(module, "language_projection"):
        shard(module.language_projection, root=True)
    elif "bridge" in module._modules:  # an MLP bridge (models/bridges.py): one trainable unit
        shard(module.bridge, root=True)
    if hasattr(module, "llm"):
        for block in transformer_blocks(module.llm):
            shard(block)
        shard(module.llm, root=True)
        for method in ("embed", "generate"):
            register_fsdp_forward_method(module.llm, method)
    check_units(module)
    return units


def reshard_trainable(units: list[nn.Module]) -> None:
    """Free the gathered parameters of the trainable units after backward (see the module docstring):
    the optimizer then updates the shards, and the next forward gathers the updated values."""
    for unit in units:
        unit.reshard()


def check_units(module: nn.Module) -> None:
    """Every trainable parameter is sharded, and no unit mixes frozen and trainable parameters."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    loose = [name for name, p in module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if loose:
        raise RuntimeError(f"trainable parameters outside every FSDP unit (their gradients would not be "
                           f"averaged over ranks): {loose[:5]}; add their module to "
                           f"blip2_train/training/fsdp.py")
    units = [(name, unit) for name, unit in module.named_modules() if isinstance(unit, FSDPModule)]
    for name, unit in units:
        inner = {id(p) for other_name, other in units if other_name.startswith(name + ".")
                 for p in other.parameters()}
        flags = {p.requires_grad for p in unit.parameters() if id(p) not in inner}
        if len(flags) > 1:
            raise RuntimeError(f"FSDP unit {name} mixes frozen and trainable parameters")

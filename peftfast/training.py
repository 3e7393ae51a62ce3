"""Layer-wise training helpers: layer-wise learning-rate decay and gradual unfreezing.

Both find a model's transformer blocks generically (the ``nn.ModuleList`` holding the most parameters whose children
are all of one class: Llama ``model.layers``, BERT ``encoder.layer``, GPT-2 ``h``, also through PEFT wrappers) and
sort every parameter into one of three places:

* **embeddings**: before the first block (in registration order), any ``nn.Embedding`` outside the blocks, and
  PEFT's ``prompt_encoder`` (prompt, prefix and P-tuning parameters act on the input side);
* **block i**: under child ``i`` of the block list, LoRA / adapter parameters inside a block included;
* **head**: after the last block (final norm, ``lm_head``, classifier / score / pooler heads).

Only parameters that are trainable (``requires_grad``) are touched, so the helpers work the same for LoRA, full
fine-tuning and any other set of trainable parameters.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

from torch import nn
from transformers import TrainerCallback

__all__ = ["GradualUnfreezing", "find_blocks", "layerwise_lr_groups"]

_EMBEDDINGS = -1  # position of parameters before the first block; blocks are 0..L-1 and the head is L


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the module of ``model``'s transformer block list.

    It is the ``nn.ModuleList`` whose children all share one class and which holds the most parameter elements
    (ties: more children). Ranking by parameters rather than by length keeps a mixture-of-experts list inside a
    block (more experts than layers) from being taken for the blocks. Raises ``ValueError`` if there is none.
    """
    best: tuple[tuple[int, int], str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(child) for child in mod}) != 1:
            continue
        key = (sum(p.numel() for p in mod.parameters()), len(mod))
        if best is None or key > best[0]:
            best = (key, name, mod)
    if best is None:
        raise ValueError(f"no transformer block list found in {type(model).__name__}: expected an nn.ModuleList whose "
                         "children are all of the same class (like Llama's model.layers or BERT's encoder.layer)")
    return best[1], best[2]


def _positions(model: nn.Module) -> tuple[int, dict[str, int]]:
    """Number of blocks ``L`` and, per parameter name, -1 (embeddings), the block index, or ``L`` (head)."""
    blocks_name, blocks = find_blocks(model)
    num_blocks = len(blocks)
    prefix = f"{blocks_name}." if blocks_name else ""
    input_side: set[str] = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding) or "prompt_encoder" in mod_name.split("."):
            input_side.update(f"{mod_name}.{n}" if mod_name else n for n, _ in mod.named_parameters())
    pos: dict[str, int] = {}
    seen_block = False
    for name, _ in model.named_parameters():
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            if index.isdigit() and rest:
                pos[name] = int(index)
                seen_block = True
                continue
        # registration order decides the side: models register embeddings, blocks, then norm and heads
        pos[name] = _EMBEDDINGS if (name in input_side or not seen_block) else num_blocks
    return num_blocks, pos


def _label(position: int, num_blocks: int) -> str:
    if position == _EMBEDDINGS:
        return "embeddings"
    return "head" if position == num_blocks else f"layer.{position}"


def layerwise_lr_groups(model: nn.Module, base_lr: float, decay: float, *, weight_decay: float = 0.0,
                        no_decay_keywords: Iterable[str] = ("bias", "norm", "LayerNorm", "ln_")) -> list[dict]:
    """Optimizer parameter groups with layer-wise learning-rate decay (ULMFiT / ELECTRA style).

    With ``L`` blocks, block ``i`` gets ``base_lr * decay ** (L - 1 - i)`` (the top block ``base_lr``), the embeddings
    ``base_lr * decay ** L`` and the head ``base_lr``. Only trainable parameters are included, each exactly once.
    Within a level, parameters whose name contains one of ``no_decay_keywords`` (biases, norm weights) get
    ``weight_decay=0.0`` and the rest ``weight_decay``. Each group has ``params``, ``lr``, ``weight_decay`` and a
    ``name`` such as ``"layer.3"``, ``"embeddings/no_decay"`` or ``"head"``; empty groups are left out.
    """
    if not (0.0 < decay <= 1.0):
        raise ValueError(f"layerwise_lr_groups: decay must be in (0, 1], got {decay!r}")
    keywords = tuple(no_decay_keywords)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("layerwise_lr_groups: the model has no trainable parameters (requires_grad=True)")
    num_blocks, pos = _positions(model)
    buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, p in trainable:
        buckets.setdefault((pos[name], any(k in name for k in keywords)), []).append(p)
    groups = []
    for position in range(_EMBEDDINGS, num_blocks + 1):
        # the embeddings (position -1) sit one level below block 0; the head shares the top block's rate
        exponent = num_blocks - 1 - position if position < num_blocks else 0
        for no_decay in (False, True):
            params = buckets.get((position, no_decay))
            if params:
                groups.append({
                    "params": params,
                    "lr": base_lr * decay**exponent,
                    "weight_decay": 0.0 if no_decay else weight_decay,
                    "name": _label(position, num_blocks) + ("/no_decay" if no_decay else ""),
                })
    return groups


class GradualUnfreezing(TrainerCallback):
    """Unfreeze the blocks from the top, one every ``every`` steps (``unit="step"``) or epochs (``unit="epoch"``).

    The schedule acts on the parameters trainable at construction (or those ``trainable_filter(name, param)``
    selects): LoRA parameters for a LoRA model, all of them for full fine-tuning. The head (after the last block)
    trains from the start; after ``k * every`` units the top ``k`` blocks are unfrozen too, and the embeddings unfreeze
    one unit after the last block. When the head has no scheduled parameters (LoRA usually leaves ``lm_head`` alone)
    the top block starts unfrozen instead, so there is always something to train: ``k + 1`` blocks after
    ``k * every`` units. Freezing sets ``requires_grad=False`` and ``grad=None``, so frozen parameters may stay in the
    optimizer (AdamW skips parameters without a gradient): build it over ``parameters()``.

    ``start_frozen=True`` freezes the parameters below the frontier now; with ``False`` the model is left alone until
    training starts (``apply()``, the first ``step()`` / ``epoch_end()``, or the Trainer's ``on_train_begin``).

    Drive it in one of two ways, never both: call ``step()`` after every optimizer step and ``epoch_end()`` after every
    epoch in a plain loop (the one that does not match ``unit`` does nothing), or pass it to a Hugging Face
    ``Trainer`` in ``callbacks=[...]``, which then follows ``state.global_step`` / ``state.epoch``. The Trainer builds
    its optimizer from the parameters with ``requires_grad`` only, so as a callback the schedule re-enables its
    parameters when the Trainer is created and freezes them again at ``on_train_begin``, after the optimizer exists.
    """

    def __init__(self, model: nn.Module, every: int, unit: str = "step", start_frozen: bool = True,
                 trainable_filter: Callable[[str, nn.Parameter], bool] | None = None):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"GradualUnfreezing: every must be a positive int, got {every!r}")
        if unit not in ("step", "epoch"):
            raise ValueError(f"GradualUnfreezing: unit must be 'step' or 'epoch', got {unit!r}")
        self.every, self.unit = every, unit
        keep = trainable_filter or (lambda _name, p: p.requires_grad)
        self._params = [(n, p) for n, p in model.named_parameters() if keep(n, p)]
        if not self._params:
            raise ValueError("GradualUnfreezing: no trainable parameters to schedule")
        self.num_blocks, pos = _positions(model)
        self._pos = {n: pos[n] for n, _ in self._params}
        self._offset = 0 if any(v == self.num_blocks for v in self._pos.values()) else 1
        self._ticks = 0
        self._applied = False
        if start_frozen:
            self.apply()

    # ------------------------------------------------------------------------------------------------------------
    # schedule
    # ------------------------------------------------------------------------------------------------------------
    @property
    def num_unfrozen_blocks(self) -> int:
        """How many blocks (counted from the top) are unfrozen now."""
        return min(self.num_blocks, self._ticks // self.every + self._offset)

    @property
    def embeddings_unfrozen(self) -> bool:
        """Whether the parameters before the first block are unfrozen (one unit after the last block)."""
        return self._ticks // self.every + self._offset > self.num_blocks

    def _is_unfrozen(self, position: int) -> bool:
        if position == _EMBEDDINGS:
            return self.embeddings_unfrozen
        return position >= self.num_blocks - self.num_unfrozen_blocks

    def parameters(self) -> list[nn.Parameter]:
        """Every scheduled parameter, frozen or not (what the optimizer should hold)."""
        return [p for _, p in self._params]

    def unfrozen_param_names(self) -> list[str]:
        """Names of the scheduled parameters that the schedule has unfrozen now, in model order."""
        return [n for n, _ in self._params if self._is_unfrozen(self._pos[n])]

    def apply(self) -> None:
        """Set ``requires_grad`` of every scheduled parameter to the current stage (frozen ones lose their grad)."""
        for name, p in self._params:
            unfrozen = self._is_unfrozen(self._pos[name])
            p.requires_grad_(unfrozen)
            if not unfrozen:
                p.grad = None
        self._applied = True

    def _set_ticks(self, ticks: int) -> None:
        changed = ticks != self._ticks
        self._ticks = ticks
        if changed or not self._applied:
            self.apply()

    def step(self) -> None:
        """Count one optimizer step (plain training loops; does nothing with ``unit="epoch"``)."""
        self._set_ticks(self._ticks + 1 if self.unit == "step" else self._ticks)

    def epoch_end(self) -> None:
        """Count one finished epoch (plain training loops; does nothing with ``unit="step"``)."""
        self._set_ticks(self._ticks + 1 if self.unit == "epoch" else self._ticks)

    # ------------------------------------------------------------------------------------------------------------
    # transformers.TrainerCallback: follows the Trainer's own counters, so repeated events cannot double-count
    # ------------------------------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):
        # the Trainer creates its optimizer later from requires_grad params only: let it see all of ours
        for _, p in self._params:
            p.requires_grad_(True)
        self._applied = False

    def on_train_begin(self, args, state, control, **kwargs):
        if self.unit == "step":
            ticks = state.global_step
        else:
            ticks = math.floor(state.epoch + 1e-9) if state.epoch else 0  # resumed mid-epoch: only whole epochs count
        self._ticks = ticks
        self.apply()
        optimizer = kwargs.get("optimizer")
        if optimizer is not None:
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            missing = [n for n, p in self._params if id(p) not in held]
            if missing:
                warnings.warn(f"GradualUnfreezing: {len(missing)} scheduled parameter(s) are not in the Trainer's "
                              f"optimizer and will never train once unfrozen (first: {missing[0]}); pass the "
                              "callback in Trainer(callbacks=[...]) or build the optimizer over schedule.parameters()",
                              stacklevel=2)

    def on_step_end(self, args, state, control, **kwargs):
        if self.unit == "step":
            self._set_ticks(state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.unit == "epoch":
            # the epoch just finished counts even when max_steps cut it short (state.epoch is then fractional)
            self._set_ticks(math.ceil(state.epoch - 1e-9) if state.epoch is not None else self._ticks + 1)

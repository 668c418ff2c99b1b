"""Loss only where there are labels: the output projection and cross-entropy computed at the
positions whose next token is a label, a chunk of positions at a time.

What transformers computes (``transformers.loss.loss_utils.ForCausalLMLoss`` and
``fixed_cross_entropy``, transformers 5): logits ``z = W h`` for every position of every row
(b × s × V, then upcast to fp32), labels shifted left by one (``y_t = labels_{t+1}``, the last
position gets -100), and

    L = (1/N) · Σ_{(r,t): y_{r,t} ≠ -100}  −log softmax(z_{r,t})[y_{r,t}]

with N = ``num_items_in_batch`` when the Trainer passes it (the labelled count over the whole
accumulated batch: gradient accumulation stays exact) and otherwise the number of labelled
positions in this batch (``reduction="mean"``; 0/0 = NaN when there are none, as there).
A position with y = -100 adds nothing to the sum and nothing to any gradient, so computing z only
at the k labelled positions is the same sum over the same terms: we gather those k hidden states
(k × d) and project them ``chunk_positions(V)`` rows at a time. Only the fp32 sum is kept; the
order of the additions differs, so the loss agrees to fp32 rounding (tested to 1e-5).

Why ``torch.utils.checkpoint`` per chunk rather than a custom ``autograd.Function``: the output
layer is whatever the model has — a plain Linear, one tied to the input embedding (its gradient
must reach the shared weight), a LoRA-wrapped ``lm_head`` when a method targets it, a trainable
one in full fine-tuning. Checkpointing saves only the chunk's hidden states and recomputes the
chunk's logits in backward through the module itself, so autograd derives every parameter's
gradient; a hand-written backward would have to know each of those cases. The recompute costs
one more chunk × d × V matmul in backward, the same as a custom Function that recomputes.

How the hidden states are obtained without the full logits ever existing: the model is called as
usual (labels included, so PEFT's wrappers still do what they do with labels: prompt tuning
prepends -100 for its virtual tokens, AdaLoRA adds its orthogonality regulariser to the loss)
but with ``logits_to_keep=1`` (one logits row per sequence), a forward hook on the decoder
captures its final hidden states, and the model's ``loss_function`` is swapped for
:func:`labelled_cross_entropy` for the length of the call. The first call is verified: the
model's own logits of the last position must equal the output layer applied to the captured
hidden state bit for bit (this catches logit soft-capping, logit scales, hidden-state
multipliers before the head and a model that does not use ``loss_function``); on any mismatch
the run falls back to the model's own loss and the log says why.
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from studio.label_chunks import chunk_positions

FULL_LOGITS_ENV = "PEFT_STUDIO_FULL_LOGITS_LOSS"  # "1": always the model's own (full-logits) loss
IGNORE_INDEX = -100
# Config fields of transformers models that change the logits after the output layer: the
# verification would catch them too, this names the reason in the log.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                        "output_multiplier")


def _chunk_loss_sum(output_layer: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = output_layer(hidden).float()  # upcast as ForCausalLMLoss does
    return F.cross_entropy(logits, targets, reduction="sum")


def labelled_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, output_layer: Any, *,
                           num_items_in_batch: Any = None, ignore_index: int = IGNORE_INDEX,
                           shift_labels: torch.Tensor | None = None, chunk: int | None = None,
                           vocab_size: int | None = None) -> torch.Tensor:
    """``ForCausalLMLoss(output_layer(hidden), labels, ...)`` without the b × s × V logits.

    ``hidden``: final hidden states [b, s, d]; ``labels`` [b, s] (unshifted) or ``shift_labels``
    (already shifted, as ``ForCausalLMLoss`` accepts)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    keep = (targets != ignore_index).nonzero().squeeze(1)
    # Only the k labelled hidden states go on (k × d, its gradient is scattered back to b·s × d).
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    targets = targets.index_select(0, keep)
    step = chunk or chunk_positions(vocab_size or int(output_layer.weight.shape[0]))
    recompute = torch.is_grad_enabled()
    total = hidden.new_zeros((), dtype=torch.float32)
    if keep.numel() == 0:
        total = total + 0.0 * hidden.float().sum()  # keeps the graph: backward gives zero gradients
    for start in range(0, keep.numel(), step):
        h, t = picked[start:start + step], targets[start:start + step]
        if recompute:
            total = total + checkpoint(_chunk_loss_sum, output_layer, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(output_layer, h, t)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / keep.numel()  # the "mean" reduction; NaN with no labels, as there


def causal_lm_of(model: Any) -> Any:
    """The transformers ``*ForCausalLM`` inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def unsupported_reason(model: Any) -> str | None:
    """Why the label-only path cannot apply to ``model``, or None when it can (first check;
    the first call is verified too, see the module docstring)."""
    if os.environ.get(FULL_LOGITS_ENV, "").strip() not in ("", "0"):
        return f"{FULL_LOGITS_ENV} is set"
    lm = causal_lm_of(model)
    if not hasattr(type(lm), "loss_function") or not callable(getattr(lm, "get_decoder", None)):
        return f"{type(lm).__name__} has no loss_function / get_decoder to hook"
    if getattr(lm, "get_output_embeddings", lambda: None)() is None:
        return f"{type(lm).__name__} has no output embedding layer"
    if "logits_to_keep" not in inspect.signature(lm.forward).parameters:
        return f"{type(lm).__name__}.forward takes no logits_to_keep"
    config = getattr(lm, "config", None)
    configs = [config, getattr(config, "text_config", None)] if config is not None else []
    for cfg in configs:
        for name in LOGIT_POSTPROCESSING:
            value = getattr(cfg, name, None)
            if value not in (None, 0, 1, 1.0, False):
                return f"the model post-processes its logits ({name}={value})"
    return None


class Capture:
    """One call's state: the decoder's final hidden states and whether our loss ran."""

    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None
        self.loss_called = False


@contextmanager
def label_only(model: Any, chunk: int | None = None) -> Iterator[Capture]:
    """Within the block, ``model(**inputs, logits_to_keep=1)`` computes its loss by
    :func:`labelled_cross_entropy` from the decoder's hidden states."""
    lm = causal_lm_of(model)
    output_layer = lm.get_output_embeddings()
    vocab = int(getattr(lm.config, "vocab_size", 0) or output_layer.weight.shape[0])
    capture = Capture()

    def keep_hidden(_module, _args, output):
        hidden = getattr(output, "last_hidden_state", None)
        capture.hidden = hidden if hidden is not None else output[0]

    def loss_function(logits=None, labels=None, vocab_size=None, num_items_in_batch=None,
                      ignore_index=IGNORE_INDEX, shift_labels=None, **_kwargs):
        if capture.hidden is None:
            raise RuntimeError("the decoder's hidden states were not captured")
        capture.loss_called = True
        return labelled_cross_entropy(capture.hidden, labels, output_layer,
                                      num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                                      shift_labels=shift_labels, chunk=chunk, vocab_size=vocab)

    had_own = "_loss_function" in vars(lm)
    previous = vars(lm).get("_loss_function")
    hook = lm.get_decoder().register_forward_hook(keep_hidden)
    lm.loss_function = loss_function  # the PreTrainedModel property's setter (instance only)
    try:
        yield capture
    finally:
        hook.remove()
        if had_own:
            lm.loss_function = previous
        else:
            del lm._loss_function


def verify(model: Any, capture: Capture, outputs: Any) -> str | None:
    """None when the call was what the label-only loss assumes, else why not: our loss ran, and
    the model's logits at the last position are exactly the output layer of the hidden state
    we captured (so nothing sits between the decoder, the output layer and the loss)."""
    if not capture.loss_called or capture.hidden is None:
        return "the model did not compute its loss through loss_function"
    logits = outputs["logits"] if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if logits is None or logits.shape[1] != 1:
        return "the model did not honour logits_to_keep=1"
    layer = causal_lm_of(model).get_output_embeddings()
    with torch.no_grad():
        ours = layer(capture.hidden[:, -1:, :])
    if ours.shape != logits.shape or not torch.equal(ours, logits.detach()):
        return ("the model's logits are not its output layer applied to the decoder's hidden states "
                "(logit scaling or soft-capping, or a multiplier before the head)")
    return None

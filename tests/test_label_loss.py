"""The label-only loss (``studio/worker/label_loss.py``) equals the model's own full-logits loss.

Real tiny Llamas (2 layers, fp32) with every registered method applied by the studio's own
``MethodSpec.apply``; nothing is mocked. For each: the loss and the gradient of every trainable
parameter from ``label_only`` equal those of the model's own forward with labels, on a padded
batch (one row without any label) and on a packed batch (position_ids, no attention_mask), with
and without ``num_items_in_batch`` (gradient accumulation's normaliser). Trainable parameters are
nudged off their initial values first, so that LoRA's zero B does not hide A's gradient.
"""

from __future__ import annotations

import gc

import pytest
import torch

from conftest import tiny_llama_config
from studio.methods.base import ApplyContext
from studio.arch import ArchInfo
from studio.methods import ORDER, get_method
from studio.worker import label_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


VOCAB = 512
IGNORE = -100


def padded_batch() -> dict:
    """Three rows of different lengths, right-padded; the loss on the tail (the "answer");
    the third row has no label at all (a prompt cut before its answer)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    mask[2, 12:] = 0
    ids[mask == 0] = 0
    labels = torch.full_like(ids, IGNORE)
    labels[0, 10:24] = ids[0, 10:24]
    labels[1, 9:17] = ids[1, 9:17]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed_batch() -> dict:
    """What ``PackedCollator`` emits: examples share a row, positions restart at 0, each
    example's first label is -100, padding is its own sequence; no attention_mask."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (2, 20), generator=g)
    positions = torch.tensor([list(range(8)) + list(range(12)),
                              list(range(15)) + list(range(5))])
    labels = ids.clone()
    labels[0, :4] = IGNORE
    labels[0, 8:13] = IGNORE
    labels[1, :6] = IGNORE
    labels[1, 15:] = IGNORE  # padding
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def tiny_model(method: str, folder) -> torch.nn.Module:
    spec = get_method(method)
    params = spec.params({"r": 4} if "r" in {f.name for f in spec.fields()} else {})
    kwargs = {}
    if spec.quantized:
        pytest.importorskip("bitsandbytes")
        from studio.methods.qlora import quantization_config

        kwargs["quantization_config"] = quantization_config(params)
    from studio.models import load_model

    model = load_model(str(folder), **kwargs)
    model.config.use_cache = False
    model = spec.apply(model, ArchInfo.from_model(model), params, ApplyContext())
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point():
                p.add_(torch.randn_like(p) * 0.05)
    model.train()
    return model


def loss_and_grads(model, batch: dict, fast: bool, **kwargs) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(4)  # the same dropout masks (LoRA dropout) in both passes
    if fast:
        with label_loss.label_only(model) as capture:
            out = model(**batch, logits_to_keep=1, **kwargs)
        assert label_loss.verify(model, capture, out) is None
        assert out.logits.shape[1] == 1  # the full logits never existed
    else:
        out = model(**batch, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("label-loss") / "model"
    AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=VOCAB)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", ORDER)
def test_label_only_loss_and_gradients_equal_the_full_loss(tiny_dir, method):
    model = tiny_model(method, tiny_dir)
    # Prompt tuning ignores position_ids (PEFT warns) and prefix tuning shifts them: both paths
    # run the same model call, so the packed batch must give equal losses for them as well.
    for batch in (padded_batch(), packed_batch()):
        for extra in ({}, {"num_items_in_batch": torch.tensor(40)}):
            full_loss, full_grads = loss_and_grads(model, batch, False, **extra)
            fast_loss, fast_grads = loss_and_grads(model, batch, True, **extra)
            assert torch.isfinite(full_loss)
            torch.testing.assert_close(fast_loss, full_loss, rtol=1e-5, atol=1e-6)
            assert fast_grads.keys() == full_grads.keys() and full_grads, method
            nonzero = 0
            for name, grad in full_grads.items():
                scale = grad.abs().max().clamp_min(1e-12)
                assert (fast_grads[name] - grad).abs().max() / scale <= 1e-5, (method, name)
                nonzero += bool(grad.abs().max() > 0)
            assert nonzero, f"{method}: every gradient is zero, nothing was compared"
    del model
    gc.collect()


def test_label_only_path_peaks_far_below_the_full_logits():
    """V = 32,000, 2 × 256 positions, all labelled: the full path holds b·s·V logits, their fp32
    log-softmax and gradient (~4 × 65 MB); the label-only path one chunk of them at a time."""
    from transformers import AutoModelForCausalLM

    from studio.measure_peak import peak_tensor_bytes

    vocab, chunk = 32_000, 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=vocab))
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)  # a gradient must reach layer 0
    ids = torch.randint(0, vocab, (2, 256), generator=torch.Generator().manual_seed(5))

    def full():
        model(input_ids=ids, labels=ids).loss.backward()

    def fast():
        with label_loss.label_only(model, chunk=chunk):
            out = model(input_ids=ids, labels=ids, logits_to_keep=1)
        out.loss.backward()

    full_peak, fast_peak = peak_tensor_bytes(full), peak_tensor_bytes(fast)
    logits_bytes = ids.numel() * vocab * 4
    assert full_peak > 3 * logits_bytes  # the measurement sees the full logits' tensors
    # One chunk's logits, fp32 log-softmax and gradient: chunk × V × (4 + 4 + 4), plus the rest.
    assert fast_peak < full_peak / 4, (fast_peak, full_peak)
    assert fast_peak < 3 * chunk * vocab * 4 + logits_bytes / 4, (fast_peak, full_peak)


def studio_trainer(model, folder):
    from transformers import TrainingArguments

    from studio.worker.trainer import StudioTrainer

    args = TrainingArguments(output_dir=str(folder), use_cpu=True, report_to="none", disable_tqdm=True,
                             gradient_accumulation_steps=2)
    trainer = StudioTrainer(model=model, args=args)
    trainer.current_gradient_accumulation_steps = 2  # set by the training loop
    return trainer


def accumulate(trainer, model, batches) -> tuple[float, dict]:
    """Two micro-batches of one optimizer step, as the training loop runs them: the Trainer's
    own ``training_step`` with the labelled count of both (``num_items_in_batch``)."""
    model.zero_grad(set_to_none=True)
    count = torch.tensor(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches))
    torch.manual_seed(6)
    loss = sum(float(trainer.training_step(model, dict(b), num_items_in_batch=count)) for b in batches)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_studio_trainer_uses_it_with_gradient_accumulation_and_can_be_switched_off(
        tiny_dir, tmp_path, monkeypatch, capsys):
    model = tiny_model("lora", tiny_dir)
    batches = [padded_batch(), packed_batch()]
    fast = studio_trainer(model, tmp_path / "fast")
    fast_loss, fast_grads = accumulate(fast, model, batches)
    assert fast.full_logits_reason == ""  # on and verified on the first batch
    assert "loss: label-only" in capsys.readouterr().out

    monkeypatch.setenv(label_loss.FULL_LOGITS_ENV, "1")
    full = studio_trainer(model, tmp_path / "full")
    full_loss, full_grads = accumulate(full, model, batches)
    assert "PEFT_STUDIO_FULL_LOGITS_LOSS is set" in full.full_logits_reason
    assert "loss: the model's own, over the full logits" in capsys.readouterr().out

    assert fast_loss == pytest.approx(full_loss, rel=1e-5)
    assert fast_grads.keys() == full_grads.keys() and fast_grads
    for name, grad in full_grads.items():
        assert (fast_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max().clamp_min(1e-12), name


def test_logits_post_processing_is_refused_and_caught_by_the_first_call_check():
    """Gemma 2 soft-caps its logits (tanh(z / 30) · 30) after the output layer: the label-only
    loss would train on the wrong logits. The config check names it, and the check on the first
    call (the model's last-position logits against the output layer of the captured hidden
    state) catches it on its own; without the cap the same model passes both."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          final_logit_softcapping=30.0)
    model = Gemma2ForCausalLM(config)
    batch = padded_batch()
    assert "final_logit_softcapping=30.0" in label_loss.unsupported_reason(model)
    with label_loss.label_only(model) as capture:
        out = model(**batch, logits_to_keep=1)
    assert "not its output layer" in label_loss.verify(model, capture, out)

    model.config.final_logit_softcapping = None
    assert label_loss.unsupported_reason(model) is None
    with label_loss.label_only(model) as capture:
        out = model(**batch, logits_to_keep=1)
    assert label_loss.verify(model, capture, out) is None
    torch.testing.assert_close(out.loss, model(**batch).loss, rtol=1e-5, atol=1e-6)


def test_the_estimates_logits_term_follows_the_label_only_path():
    """The memory estimate's logits term against the measured peak of a label-only training
    step (all 2 × 512 positions labelled, V = 32,000: chunks of 524 and 500 positions). The old
    b·s × V × 12 B term would be twice the measurement."""
    from transformers import AutoModelForCausalLM

    from studio.estimate import TrainSetup, estimate_training
    from studio.measure_peak import peak_tensor_bytes

    vocab = 32_000
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=vocab))
    arch = ArchInfo.from_model(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    ids = torch.randint(0, vocab, (2, 512), generator=torch.Generator().manual_seed(7))

    def step():
        with label_loss.label_only(model):  # the default chunk rule, as in training
            out = model(input_ids=ids, labels=ids, logits_to_keep=1)
        out.loss.backward()

    measured = peak_tensor_bytes(step)  # the loss's tensors plus this tiny model's activations
    lora = get_method("lora")
    term = estimate_training(arch, "lora", lora.params(), 1, TrainSetup(2, 512, "fp32", device="cpu")
                             ).term("logits").bytes
    assert 0.95 * term <= measured <= 1.15 * term, (measured, term)


def test_gradient_checkpointing_and_a_batch_without_any_label(tiny_dir):
    """With the decoder's gradient checkpointing on (the run's switch), the label-only loss still
    equals the full loss. A micro-batch with no label at all (possible under gradient
    accumulation) gives 0 and zero gradients with ``num_items_in_batch``, NaN without, as the
    model's own loss does."""
    model = tiny_model("lora", tiny_dir)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    batch = padded_batch()
    full_loss, full_grads = loss_and_grads(model, batch, False)
    fast_loss, fast_grads = loss_and_grads(model, batch, True)
    torch.testing.assert_close(fast_loss, full_loss, rtol=1e-5, atol=1e-6)
    for name, grad in full_grads.items():
        assert (fast_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max().clamp_min(1e-12), name

    empty = {**batch, "labels": torch.full_like(batch["labels"], IGNORE)}
    count = {"num_items_in_batch": torch.tensor(7)}
    full_loss, full_grads = loss_and_grads(model, empty, False, **count)
    fast_loss, fast_grads = loss_and_grads(model, empty, True, **count)
    assert float(fast_loss) == float(full_loss) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in fast_grads.values())
    with label_loss.label_only(model):
        nan = model(**empty, logits_to_keep=1).loss
    assert torch.isnan(nan) and torch.isnan(model(**empty).loss)

"""GaLore and APOLLO (studio/methods/galore.py): the estimate's optimizer state equals the bytes a
real galore-torch / apollo-torch optimizer holds after one step, built by transformers' own
integration from the method's TrainingArguments keywords; the runs the methods cannot train are
refused before a run row exists; a tiny model trains through the worker's own code, its loss
falls, and the saved whole model reloads with plain transformers, answers differently from the
base, exports like full fine-tuning and stays out of Compare's adapter list as full's does."""

from __future__ import annotations

import gc

import pytest
import torch

from conftest import CONFIGS, tiny_llama_config
from studio.arch import ArchInfo
from studio.estimate import TrainSetup, estimate_training
from studio.methods import SettingError, get_method
from studio.methods.base import ApplyContext
from studio.models import load_config
from studio.run_setup import DeviceFacts, SetupError, training_setup
from studio.runspec import RunSpec, RunSpecError
from worker_helpers import explain, folder_of, metrics, tiny_spec, train_here

pytest.importorskip("galore_torch")
pytest.importorskip("apollo_torch")

CPU = DeviceFacts("cpu", None, False, None)


def real_optimizer(model, keywords: dict):
    """The optimizer transformers' Trainer builds for these keywords (the same call as
    ``Trainer.create_optimizer``), and the per-parameter optimizers of a layer-wise one."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments("unused", use_cpu=True, report_to="none", **keywords)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    groups = kwargs.pop("params")
    if "optimizer_dict" in kwargs:  # layer-wise: stepped by post-accumulate-grad hooks
        return list(kwargs["optimizer_dict"].values())
    return [cls(groups, **kwargs)]


def held_bytes(optimizers) -> int:
    """Bytes the optimizers' state really holds: each tensor's storage (a slice that keeps its
    whole SVD factor alive counts the factor), the projectors' matrices included."""
    storages: dict[int, int] = {}
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for value in state.values():
                matrix = getattr(value, "ortho_matrix", value)  # a GaLore/APOLLO projector
                if torch.is_tensor(matrix):
                    storage = matrix.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("method,settings,dtype", [
    ("galore", {"rank": 48}, torch.float32),  # rank above k_proj's 32 rows: r' = min(r, m)
    ("galore", {"rank": 8}, torch.bfloat16),
    ("galore", {"rank": 8, "variant": "adafactor"}, torch.float32),
    ("galore", {"rank": 8, "layerwise": True, "target_preset": "mlp"}, torch.float32),
    ("apollo", {"rank": 48}, torch.float32),
    ("apollo", {"rank": 1, "scale_type": "tensor", "scale": 128}, torch.bfloat16),
    ("apollo", {"rank": 8, "proj": "svd", "target_preset": "attention"}, torch.float32),
], ids=lambda v: str(v).replace("torch.", ""))
def test_optimizer_state_equals_the_real_optimizer_after_one_step(method, settings, dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config()
    arch = ArchInfo.from_config(config)
    spec = get_method(method)
    params = spec.params(settings)
    model = spec.apply(AutoModelForCausalLM.from_config(config).to(dtype), arch, params, ApplyContext())
    optimizers = real_optimizer(model, spec.trainer_optim(arch, params))
    ids = torch.randint(0, config.vocab_size, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    if len(optimizers) == 1:
        optimizers[0].step()
    # (layer-wise: the hooks stepped every parameter during backward and freed its gradient)
    assert all(p.grad is None for p in model.parameters()) == params.layerwise
    width = 2 if dtype == torch.bfloat16 else 4
    est = estimate_training(arch, method, params, spec.count(arch, params).trainable,
                            TrainSetup(2, 8, "bf16" if width == 2 else "fp32", device="cpu"))
    measured = held_bytes(optimizers)
    assert est.term("optimizer").bytes == measured, est.term("optimizer").formula
    if params.rank <= 8:  # the point of the method: less state than full AdamW's two moments
        assert measured < 2 * arch.total_params * width


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_8bit_state_equals_bitsandbytes_after_one_step(monkeypatch, dtype):
    """galore-torch's AdamW8bit is refused on a CPU only because its step calls
    ``torch.cuda.synchronize()``, which waits for nothing without CUDA; with that call a no-op,
    the real bitsandbytes state is measured here. Widths 128/256 put tensors on both sides of
    bitsandbytes' 4,096-value threshold."""
    from transformers import AutoModelForCausalLM

    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=128, intermediate_size=256)
    arch = ArchInfo.from_config(config)
    spec = get_method("galore")
    params = spec.params({"rank": 32, "variant": "adamw_8bit"})
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    optimizer = real_optimizer(model, spec.trainer_optim(arch, params))[0]
    ids = torch.randint(0, config.vocab_size, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    kinds = {v.dtype for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)}
    assert torch.uint8 in kinds  # some states really are 8-bit
    est = estimate_training(arch, "galore", params, arch.total_params,
                            TrainSetup(2, 8, "bf16" if dtype == torch.bfloat16 else "fp32", device="cpu"))
    assert est.term("optimizer").bytes == held_bytes([optimizer]), est.term("optimizer").formula


def test_a_checkpoints_optimizer_state_loads_back_with_the_safe_loader():
    """What Resume does: the Trainer saves ``optimizer.state_dict()`` and reads it back with
    ``torch.load(weights_only=True)``; the projectors in it are allowed by ``trainer_optim``."""
    import io

    from transformers import AutoModelForCausalLM

    config = tiny_llama_config()
    arch = ArchInfo.from_config(config)
    before = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()  # as in a fresh worker (no test before this one)
    for method in ("galore", "apollo"):
        spec = get_method(method)
        params = spec.params({"rank": 4})
        model = AutoModelForCausalLM.from_config(config)
        optimizer = real_optimizer(model, spec.trainer_optim(arch, params))[0]
        ids = torch.randint(0, config.vocab_size, (1, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        saved = io.BytesIO()
        torch.save(optimizer.state_dict(), saved)
        saved.seek(0)
        again = real_optimizer(model, spec.trainer_optim(arch, params))[0]
        again.load_state_dict(torch.load(saved, weights_only=True))
        projectors = [s["projector"] for s in again.state.values() if "projector" in s]
        assert projectors and all(p.ortho_matrix is not None for p in projectors)
    torch.serialization.add_safe_globals(before)


def test_layerwise_holds_one_gradient_and_says_what_it_saves():
    arch = ArchInfo.from_config(load_config(str(CONFIGS / "smollm2-135m.json")))
    spec = get_method("galore")
    setup = TrainSetup(1, 32, "bf16")  # few activations: at the step, every gradient is held
    plain = estimate_training(arch, "galore", spec.params(), arch.total_params, setup)
    layerwise = estimate_training(arch, "galore", spec.params({"layerwise": True}), arch.total_params, setup)
    assert layerwise.term("optimizer").bytes == plain.term("optimizer").bytes
    largest = max(numel for numel, _ in arch.param_tensors) * 2
    assert layerwise.term("gradients").bytes == largest < plain.term("gradients").bytes
    assert "layer-wise" in layerwise.term("gradients").formula
    assert f"({largest:,} B) instead of all {arch.total_params * 2:,} B" in plain.term("optimizer").formula
    full = estimate_training(arch, "full", get_method("full").params(), arch.total_params, setup)
    assert plain.term("optimizer").bytes < full.term("optimizer").bytes / 2
    assert plain.term("weights").bytes == full.term("weights").bytes  # every weight, its dtype


def test_nothing_to_project_and_bad_settings_are_refused_with_the_reason():
    gpt2 = ArchInfo.from_config(load_config(str(CONFIGS / "gpt2.json")))
    spec = get_method("galore")
    assert spec.count(gpt2, spec.params()).trainable == gpt2.total_params
    with pytest.raises(SettingError, match="not nn.Linear"):  # GPT-2's blocks are Conv1D
        estimate_training(gpt2, "galore", spec.params(), gpt2.total_params, TrainSetup(device="cpu"))
    with pytest.raises(SettingError, match="'rank' must be at least 1"):
        spec.params({"rank": 0})
    with pytest.raises(SettingError, match="must be one of"):
        spec.params({"variant": "sgd"})
    with pytest.raises(SettingError, match="has no setting 'proj'"):
        spec.params({"proj": "random"})  # APOLLO's, not GaLore's
    with pytest.raises(SettingError, match="must be one of"):
        get_method("apollo").params({"scale_type": "row"})


@pytest.mark.parametrize("fields,match", [
    ({"method_settings": {"layerwise": True}, "grad_accum": 2}, "'grad_accum'.*layer-wise"),
    ({"optimizer": "sgd"}, "'optimizer'.*itself the optimizer"),
    ({"weight_decay": 0.1}, "'weight_decay'.*no weight decay"),
])
def test_runs_the_method_cannot_train_are_refused_by_the_runspec(fields, match):
    for method in ("galore", "apollo"):
        with pytest.raises(RunSpecError, match=match):
            RunSpec(method=method, sample_task="dates", **fields).validate()
    RunSpec(method="galore", sample_task="dates", method_settings={"layerwise": True}).validate()


def test_the_bakeoff_accepts_both_at_their_documented_rate():
    from studio.bakeoff import Budget, method_spec

    for method in ("galore", "apollo"):
        spec = method_spec("default", method, Budget(), sample_task="dates")  # validated
        assert spec.learning_rate == get_method(method).default_learning_rate == 1e-4
        assert training_setup(spec, CPU).precision in ("fp32", "bf16")


def test_8bit_galore_is_refused_on_the_cpu_and_offered_on_a_gpu():
    spec = RunSpec(method="galore", sample_task="dates", method_settings={"variant": "adamw_8bit"}).validate()
    with pytest.raises(SetupError, match="torch.cuda.synchronize.*adamw or adafactor"):
        training_setup(spec, CPU)
    gpu = DeviceFacts("cuda", 80 * 2**30, True, None, 80 * 2**30)
    assert training_setup(spec, gpu).precision == "bf16"


@pytest.mark.parametrize("method", ["galore", "apollo"])
def test_trains_through_the_worker_loss_falls_and_the_saved_model_reloads(db, tiny_chat_model, method):
    """Also, for GaLore: the export is full fine-tuning's (a merged whole model, no adapter), and
    Compare, which attaches adapters to one base, lists no adapter of it, as for full."""
    from transformers import AutoModelForCausalLM

    from studio.compare.sources import project_adapters
    from studio.export import ExportError, export_run
    from studio.runs import launch

    steps = 5
    settings = {"rank": 8, "update_proj_gap": 2} if method == "galore" else {"rank": 8}
    # A random model starts near ln(V) ≈ 10.8: learning shows within a few steps on any batch.
    spec = tiny_spec(tiny_chat_model, method=method, method_settings=settings, max_steps=steps,
                     batch_size=2, learning_rate=5e-3)
    run = train_here(db, spec)
    assert run.status == "completed", explain(db, run)
    loss = metrics(db, run.id)["loss"]
    assert sorted(loss) == list(range(1, steps + 1))
    assert min(loss[steps - 1], loss[steps]) < loss[1] - 0.5, loss
    saved = folder_of(db, run.id) / "adapter"
    assert (saved / "config.json").is_file() and (saved / "model.safetensors").is_file()
    trained = AutoModelForCausalLM.from_pretrained(saved).eval()  # plain transformers, safetensors
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        logits = trained(ids).logits
        assert not torch.allclose(logits, base(ids).logits, atol=1e-4)
    # every projected weight moved: the low-rank update reached each block's Linear layers
    weights = dict(trained.named_parameters())
    for name, weight in base.named_parameters():
        if name.endswith("proj.weight"):
            assert not torch.equal(weight, weights[name]), name
    del trained, base
    gc.collect()
    if method != "galore":
        return
    with pytest.raises(ExportError, match="no adapter"):
        export_run(db, run.id, "adapter")
    # Unverified here (the verification child costs seconds; full's export test runs it): the
    # exported folder is reloaded below with plain transformers instead.
    export = export_run(db, run.id, "merged", "float32", verify=False)
    exported = AutoModelForCausalLM.from_pretrained(export.path).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, logits)
    assert project_adapters(db, run.project_id, lambda r: launch.run_folder(db, r)) == []


def test_fit_advice_offers_no_accumulation_to_a_layerwise_run(monkeypatch):
    """Halving the batch keeps the effective batch through accumulation, which layer-wise
    updates cannot do: that alternative is left out, the others stay."""
    from studio import fit_advice, planner

    arch = ArchInfo.from_config(tiny_llama_config())
    monkeypatch.setattr(planner, "arch_for", lambda model: arch)  # no model folder to read here
    for layerwise in (False, True):
        spec = RunSpec(model="tiny", method="galore", sample_task="dates", batch_size=4,
                       method_settings={"layerwise": layerwise}).validate()
        labels = [row.label for row in fit_advice.alternatives(spec, CPU)]
        assert any("accumulate" in label for label in labels) != layerwise, labels
        assert "gradient checkpointing on" in labels

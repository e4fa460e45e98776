"""Knowledge distillation from the dense model during recovery: the loss term, the teacher, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import cli, tiny_llama

from gaqprune.core import surgery, units
from gaqprune.core.metrics import causal_losses, causal_nll
from gaqprune.models import pruned as export
from gaqprune.models.load import EMBEDDED, EMBEDDED_SOURCE
from gaqprune.train.module import LitCausalLM, teacher_source


def pruned_copy(model):
    """``model`` with half of the MLP channels of layers 1 and 2 and one KV group of layer 2 removed."""
    student = tiny_llama(vocab_size=model.config.vocab_size)
    student.load_state_dict(model.state_dict())
    for i in (1, 2):
        layer = student.model.layers[i]
        surgery.keep_units(layer, units.MLP, torch.arange(0, units.num_channels(layer), 2))
    surgery.keep_units(student.model.layers[2], units.ATTENTION, torch.tensor([1]))
    return student.eval()


def manual_kl(student, teacher, ids, labels, temperature):
    """sum over predicted positions of T^2 * KL(softmax(t / T) || softmax(s / T)) from full logits."""
    with torch.no_grad():
        s, t = student(ids).logits[:, :-1], teacher(ids).logits[:, :-1]
    keep = labels[:, 1:] != -100
    s_log, t_log = F.log_softmax(s[keep] / temperature, -1), F.log_softmax(t[keep] / temperature, -1)
    return (t_log.exp() * (t_log - s_log)).sum() * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_term_is_the_kl_to_the_teacher(random_windows, temperature):
    teacher = tiny_llama()
    student = pruned_copy(teacher)
    labels = random_windows.clone()
    labels[:, :5] = -100  # e.g. an instruction prompt: neither term counts it
    with torch.no_grad():
        nll, kl, count = causal_losses(student, random_windows, labels=labels, teacher=teacher,
                                       temperature=temperature, chunk_tokens=7)
        nll_only, count_only = causal_nll(student, random_windows, labels=labels)
        same_nll, self_kl, _ = causal_losses(teacher, random_windows, labels=labels, teacher=teacher)
    assert count == count_only == 6 * (32 - 5)
    assert torch.allclose(nll, nll_only, rtol=1e-5)
    expected = manual_kl(student, teacher, random_windows, labels, temperature)
    assert kl.item() > 1e-3  # the pruned student really differs
    assert torch.allclose(kl, expected, rtol=1e-4), (kl.item(), expected.item())
    assert abs(self_kl.item()) < 1e-4 * count.item()  # the dense model against itself: KL 0


def test_distillation_gradients_pull_the_student_toward_the_teacher(random_windows):
    teacher = tiny_llama()
    student = pruned_copy(teacher)
    params = [p for n, p in student.named_parameters() if "layers.2." in n]
    opt = torch.optim.Adam(params, lr=3e-3)
    student.train()
    kls = []
    for _ in range(8):
        _, kl, count = causal_losses(student, random_windows, teacher=teacher)
        opt.zero_grad()
        (kl / count).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        opt.step()
        kls.append((kl / count).item())
    assert kls[-1] < 0.7 * kls[0] and kls[-1] == min(kls), kls


def pruned_checkpoint(tiny_model_dir, path):
    """A saved pruned copy of the tiny model in ``tiny_model_dir``, recording that folder as its source."""
    from gaqprune.models.load import load_model, load_tokenizer

    return export.save_pretrained_model(pruned_copy(load_model(str(tiny_model_dir))), load_tokenizer(str(tiny_model_dir)),
                                        path, base_model=str(tiny_model_dir))


def test_teacher_defaults_to_the_model_the_checkpoint_was_pruned_from(tiny_model_dir, tmp_path):
    ckpt = pruned_checkpoint(tiny_model_dir, tmp_path / "pruned")
    assert teacher_source(str(ckpt)) == str(tiny_model_dir)
    assert teacher_source(str(ckpt), "elsewhere") == "elsewhere"
    assert teacher_source(str(tiny_model_dir)) == str(tiny_model_dir)  # pruning in the same run: still dense
    embedded = export.save_pretrained_model(pruned_copy(tiny_llama()), None, tmp_path / "from_embedded",
                                            base_model=EMBEDDED_SOURCE)
    assert teacher_source(str(embedded)) == EMBEDDED  # what `gaqprune prune` records for the embedded model


class _Trainer:  # what on_fit_start and training_step read besides the module's device
    global_step = 0

    class state:
        fn = "fit"


def test_lit_module_mixes_the_two_losses(tiny_model_dir, tmp_path, random_windows):
    ckpt = pruned_checkpoint(tiny_model_dir, tmp_path / "pruned")
    lit = LitCausalLM(base_model=str(ckpt), distill_weight=0.25, distill_temperature=2.0, lora_dropout=0.0)
    lit._trainer = _Trainer()
    lit.configure_model()
    lit.on_fit_start()
    assert lit._teacher is not None and "_teacher" not in dict(lit.named_modules())
    assert not any("_teacher" in name for name in lit.state_dict())
    assert all(not p.requires_grad for p in lit._teacher.parameters())
    lit.log_dict = lambda *a, **k: None
    lit.log = lambda *a, **k: None
    loss = lit.training_step((random_windows,), 0)
    with torch.no_grad():
        nll, kl, count = causal_losses(lit.model, random_windows, teacher=lit._teacher, temperature=2.0)
    assert torch.allclose(loss.detach(), 0.75 * nll / count + 0.25 * kl / count, rtol=1e-5)
    lit.on_fit_end()
    assert lit._teacher is None


def test_fit_with_distillation_from_a_pruned_checkpoint(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ckpt = pruned_checkpoint(tiny_model_dir, tmp_path / "pruned")
    r = cli("fit", "--base_model", str(ckpt), "--distill_weight", "0.5", "--data.max_seq_len", "32",
             "--data.max_eval_windows", "4", "--data.batch_size", "4", "--finetune_samples", "16",
             "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1", "--trainer.max_steps", "3",
             "--save_ckpt_log_name", "kd", "--trainer.default_root_dir", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent)).Reload()
    distill = [e.value for e in events.Scalars("train_distill_loss")]
    assert len(distill) == 3 and all(v > 0 for v in distill)
    assert len(events.Scalars("train_lm_loss")) == 3
    config = json.loads((tmp_path / "prune_log" / "kd" / "model_finetuned" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4


@pytest.mark.parametrize("args, message", [
    (["--distill_weight", "1.5"], "--distill_weight 1.5 must be in [0, 1]"),
    (["--distill_weight", "0.5", "--distill_temperature", "0"], "--distill_temperature 0.0 must be > 0"),
    (["--teacher_model", "x"], "--teacher_model 'x' is only used with --distill_weight > 0"),
    (["--distill_weight", "0.5", "--teacher_model", "/nonexistent/teacher"],
     "--teacher_model '/nonexistent/teacher' cannot be used as the distillation teacher"),
])
def test_bad_distillation_flags_fail_in_one_line(tiny_model_dir, tmp_path, args, message):
    r = cli("fit", "--base_model", str(tiny_model_dir), *args, "--trainer.default_root_dir", str(tmp_path), cwd=tmp_path)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "prune_log").exists()

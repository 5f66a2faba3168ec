"""Healing on tiny random models: the loss falls, interrupted runs resume exactly, the result loads, bad input fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny import byte_tokenizer, save_source
from transmla.convert import ConvertOptions, convert
from transmla.errors import TransMLAError
from transmla.heal import HealOptions, heal
from transmla.heal.run import select_trainable
from transmla.workflows import convert_and_heal
from transmla.heal.checkpoint import checkpoints, default_work_dir
from transmla.data.text import pack, tokenize_documents
from transmla.heal.data import WindowStream, parse_tokens
from transmla.heal.loss import distillation_loss, hidden_distillation_loss

SEQ = 64
BATCH = 4


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def make_converted(root: Path, kind: str = "llama-gqa") -> Path:
    save_source(kind, root / f"{kind}-src")
    out = root / f"{kind}-mla"
    convert(str(root / f"{kind}-src"), out, ConvertOptions(method="svd", kv_lora_rank=4, rope_dim=8), progress=False)
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return make_converted(tmp_path_factory.mktemp("models"))


def options(path: Path, **kw) -> HealOptions:
    base = dict(tokens=6 * SEQ * BATCH, data=(f"file:{path}",), seq_len=SEQ, batch_size=BATCH, lr=3e-3,
                warmup=0.0, checkpoint_every=0, gradient_checkpointing=True)
    return HealOptions(**{**base, **kw})


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_distillation_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    zero, parts = distillation_loss(logits, logits.clone(), ids)
    assert zero.item() == pytest.approx(0.0, abs=1e-6) and "ce" not in parts
    other = torch.randn(2, 5, 11)
    kl, _ = distillation_loss(logits, other, ids)
    reference = torch.nn.functional.kl_div(logits.log_softmax(-1).flatten(0, 1), other.log_softmax(-1).flatten(0, 1),
                                           log_target=True, reduction="batchmean")
    assert kl.item() == pytest.approx(reference.item(), rel=1e-5) and kl.item() > 0
    hot, _ = distillation_loss(logits, other, ids, temperature=2.0)
    assert hot.item() != pytest.approx(kl.item())
    both, parts = distillation_loss(logits, other, ids, ce_weight=0.5)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert both.item() == pytest.approx(kl.item() + 0.5 * ce.item(), rel=1e-5)
    wide, _ = distillation_loss(logits, torch.cat([other, torch.full((2, 5, 3), -1e4)], -1), ids)
    assert wide.item() == pytest.approx(kl.item(), rel=1e-5)  # a padded teacher vocabulary is cut to the student's


def test_chunked_distillation_loss_equals_the_whole_one():
    """The KL from hidden states, a few tokens at a time, is the KL of the full logits, and so is its gradient."""
    torch.manual_seed(0)
    student_head, teacher_head = torch.nn.Linear(8, 11, bias=False), torch.nn.Linear(8, 13, bias=False)
    hidden, teacher_hidden = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8)
    whole, _ = distillation_loss(student_head(hidden), teacher_head(teacher_hidden), torch.zeros(2, 5, dtype=torch.long),
                                 temperature=2.0)
    expected = torch.autograd.grad(whole, hidden)[0]
    chunked, parts = hidden_distillation_loss(hidden, student_head, teacher_hidden, teacher_head, 2.0, chunk_tokens=3)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6) and parts["kl"].item() == chunked.item()
    assert (torch.autograd.grad(chunked, hidden)[0] - expected).abs().max().item() < 1e-6


def test_data_helpers():
    assert parse_tokens("2M") == 2_000_000 and parse_tokens("500k") == 500_000 and parse_tokens(" 1_000 ") == 1000
    with pytest.raises(TransMLAError):
        parse_tokens("lots")
    stream = tokenize_documents(byte_tokenizer(), ["abc", "de"], max_tokens=None, separator=2)
    assert stream.tolist() == [97, 98, 99, 2, 100, 101]
    windows = pack(torch.arange(105), 10)
    assert windows.shape == (10, 10) and windows[3, 0].item() == 30  # consecutive, the tail dropped
    # two processes together visit every window once per epoch, and batches depend on the step alone
    data = torch.arange(12)[:, None]
    seen = [WindowStream(data, 3, seed=1, rank=r, world=2).batch(m) for m in range(2) for r in range(2)]
    assert sorted(torch.cat(seen).flatten().tolist()) == list(range(12))
    assert torch.equal(WindowStream(data, 3, 1).batch(5), WindowStream(data, 3, 1).batch(5))


def test_few_steps_lower_the_distillation_loss(converted, text_file, tmp_path):
    result = heal(converted, tmp_path / "healed", options(text_file, tokens=12 * SEQ * BATCH, train="all", eval_every=4), progress=False)
    assert result.steps == 12 and result.tokens == 12 * SEQ * BATCH
    first = sum(h["kl"] for h in result.history[:3]) / 3
    last = sum(h["kl"] for h in result.history[-3:]) / 3
    assert last < 0.8 * first
    assert [e["step"] for e in result.evals] == [0, 4, 8, 12]
    # the healed model is closer to the teacher than the converted one on held-out text
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(converted.parent / "llama-gqa-src")
    ids = torch.tensor([list(text_file.read_bytes()[-4 * SEQ :])]).view(4, SEQ)
    target = teacher(input_ids=ids).logits

    def kl(folder: Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        return distillation_loss(model(input_ids=ids).logits, target, ids)[0].item()

    assert kl(tmp_path / "healed") < kl(converted)
    assert abs(result.after_perplexity - result.teacher_perplexity) < abs(result.before_perplexity - result.teacher_perplexity)


def test_resume_continues_from_the_saved_step(converted, text_file, tmp_path):
    opts = options(text_file, grad_accum=2, checkpoint_every=2, tokens=6 * SEQ * BATCH * 2)
    straight = heal(converted, tmp_path / "straight", opts, progress=False)

    def stop_at_3(step: int, record: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        heal(converted, out, opts, progress=False, on_step=stop_at_3)
    assert not out.exists()
    saved = [p.name for p in checkpoints(default_work_dir(out))]
    assert saved == ["checkpoint-00000002", "checkpoint-00000003"]  # periodic, then on the interruption

    with pytest.raises(TransMLAError, match="holds checkpoints"):
        heal(converted, out, opts, progress=False)
    with pytest.raises(TransMLAError, match="changed: lr"):
        heal(converted, out, HealOptions(**{**vars(opts), "lr": 1.0, "resume": True}), progress=False)

    steps: list[int] = []
    resumed = heal(converted, out, HealOptions(**{**vars(opts), "resume": True}), progress=False,
                   on_step=lambda step, record: steps.append(step))
    assert steps == [4, 5, 6] and resumed.steps == 6 and resumed.tokens == straight.tokens
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    assert resumed.before_perplexity == straight.before_perplexity
    # same data order, optimizer moments and schedule: the same weights as the uninterrupted run
    a, b = weights(tmp_path / "straight"), weights(out)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert not default_work_dir(out).exists()


def test_healed_checkpoint_loads_and_generates(tmp_path, text_file):
    converted = make_converted(tmp_path, "qwen2")  # tied embeddings and attention biases
    out = tmp_path / "healed"
    result = heal(converted, out, options(text_file, tokens=2 * SEQ * BATCH, train="attention", ce_weight=0.1), progress=False)
    assert "ce" in result.history[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("the latent", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 8)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "transmla" and config["conversion"]["heal"]["steps"] == 2
    assert config["source_model"] == json.loads((converted / "config.json").read_text())["source_model"]
    assert (out / "generation_config.json").is_file() and (out / "heal_log.json").is_file()
    assert json.loads((out / "transmla.json").read_text())["heal"]["tokens"] == 2 * SEQ * BATCH
    # attention trained, everything else untouched
    before, after = weights(converted), weights(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".self_attn." in k for k in changed)


def test_latent_trains_only_the_kv_projections(converted):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True)
    select_trainable(model, "latent")
    names = {n.split("self_attn.")[-1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"kv_a_proj", "kv_b_proj"}
    assert select_trainable(model, "all") == sum(p.numel() for p in model.parameters())


def test_self_distill_and_convert_then_heal(tmp_path):
    save_source("llama-gqa", tmp_path / "src")
    opts = HealOptions(tokens=2 * 32 * 2, seq_len=32, sample_len=48, batch_size=2, lr=1e-3,
                       checkpoint_every=0, max_val_windows=1)  # no text given: sampled from the teacher
    result = convert_and_heal(str(tmp_path / "src"), tmp_path / "healed", ConvertOptions(method="svd", kv_lora_rank=4, rope_dim=8), opts, progress=False)
    assert result.steps == 2 and result.data == "self"
    assert result.train_windows == 4 and result.validation_windows == 1  # enough for the budget, plus one held out
    assert (tmp_path / "healed" / "model.safetensors").is_file()
    assert not (tmp_path / "healed.unhealed").exists()


def test_bad_input(converted, text_file, tmp_path):
    with pytest.raises(TransMLAError, match="does not exist"):
        heal(tmp_path / "missing", tmp_path / "o", options(text_file), progress=False)
    save_source("llama-gqa", tmp_path / "plain")
    with pytest.raises(TransMLAError, match="not a converted checkpoint"):
        heal(tmp_path / "plain", tmp_path / "o", options(text_file), progress=False)
    with pytest.raises(TransMLAError, match="is not one of self, file:PATH, dataset:NAME"):
        heal(converted, tmp_path / "o", options(text_file, data=("bogus-source",)), progress=False)
    with pytest.raises(TransMLAError, match="given twice"):
        heal(converted, tmp_path / "o", options(text_file, data=("self", "self@2")), progress=False)
    with pytest.raises(TransMLAError, match="weight after '@' must be a positive number"):
        heal(converted, tmp_path / "o", options(text_file, data=("self@0",)), progress=False)
    with pytest.raises(TransMLAError, match="text file not found"):
        heal(converted, tmp_path / "o", options(tmp_path / "nope.txt"), progress=False)
    with pytest.raises(TransMLAError, match="--train"):
        heal(converted, tmp_path / "o", options(text_file, train="mlp"), progress=False)
    with pytest.raises(TransMLAError, match="nothing to resume"):
        heal(converted, tmp_path / "o", options(text_file, resume=True), progress=False)
    with pytest.raises(TransMLAError, match="holds files of its own"):
        heal(converted, tmp_path / "o", options(text_file, work_dir=str(text_file.parent)), progress=False)
    assert text_file.is_file()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(TransMLAError, match="not empty"):
        heal(converted, tmp_path / "full", options(text_file), progress=False)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(TransMLAError, match="gives 0 windows of 64 tokens, too few to hold 2 out"):
        heal(converted, tmp_path / "o", options(short), progress=False)
    with pytest.raises(TransMLAError, match="teacher"):
        heal(converted, tmp_path / "o", options(text_file, teacher=str(tmp_path / "no-teacher")), progress=False)


def test_command_line(tmp_path, text_file):
    from typer.testing import CliRunner

    from transmla.cli import app

    runner = CliRunner()
    save_source("llama-gqa", tmp_path / "src")
    common = ["--seq-len", "64", "--batch-size", "4"]
    result = runner.invoke(app, ["convert", str(tmp_path / "src"), "--out", str(tmp_path / "mla"), "-r", "4", "-d", "8", "--method", "svd"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["heal", str(tmp_path / "mla"), "--out", str(tmp_path / "healed"), "--tokens", "0.5k",
                                 "--text-file", str(text_file), "--train", "latent", "--no-gradient-checkpointing", *common])
    assert result.exit_code == 0, result.output
    assert "2 steps" in result.output and (tmp_path / "healed" / "model.safetensors").is_file()
    result = runner.invoke(app, ["heal", str(tmp_path / "mla"), "--out", str(tmp_path / "other"), "--tokens", "1k",
                                 "--data", "self@2", "--text-file", str(text_file), "--sample-len", "64", *common])
    assert result.exit_code == 0, result.output  # a mixture: two thirds sampled from the teacher
    record = json.loads((tmp_path / "other" / "transmla.json").read_text())["heal"]
    assert record["data"].startswith("67% self + 33% file:")
    result = runner.invoke(app, ["heal", str(tmp_path / "mla"), "--out", str(tmp_path / "bad"), "--tokens", "1k",
                                 "--data", "dataset", *common])
    assert result.exit_code == 1
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "is not one of self, file:PATH" in lines[0]

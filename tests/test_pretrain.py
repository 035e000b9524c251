"""Pre-training with a sink token (paper Sec. 3.3) on a tiny corpus, a few steps: the three variants differ as
designed, a resumed run equals an uninterrupted one, and the engine streams each trained variant exactly."""

import dataclasses
import random

import pytest
import torch
from helpers import engine_logits
from oracle import oracle_logits

import streamllm
from streamllm import StreamConfig
from streamllm.cli import main
from streamllm.experiments.pretrain import corpus, data, evaluate, model, train
from streamllm.runtime.perplexity import streaming_nll

WORDS = "the a of sink token stream cache window attention model river stone light night day sea king".split()


def _docs(n: int = 120):
    rng = random.Random(0)
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(40, 90))]
        yield "tiny", f"doc{i}", " ".join(words).capitalize() + ".\n"


SETTINGS = dict(
    shape=model.Shape(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48, max_positions=256),
    seq_len=24,
    batch_size=2,
    steps=4,
    segment=2,
    warmup=1,
    milestones=(2,),
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run (every variant 4 steps, in turns of 2), under a temporary STREAMLLM_HOME."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STREAMLLM_HOME", str(home))
        tokens = data.build(_docs(), home / "pretrain" / "data", vocab_size=300)
        folder = train.runs_dir() / "tiny"
        settings = train.Settings(data=str(tokens.folder), **SETTINGS)
        assert train.train(folder, settings) == dict.fromkeys(model.VARIANTS, 4)
        yield folder, settings, tokens


def test_held_out_documents_are_whole_and_apart(run):
    _, _, tokens = run
    held = [name for _, name, _ in _docs() if corpus.is_held_out("tiny", name)]
    stats = tokens.stats()
    assert stats["heldout_documents"] == len(held) > 0
    assert stats["train_documents"] == 120 - len(held)
    for split in ("train", "heldout"):  # documents packed, each ended by <|endoftext|>; no sink anywhere
        stream = tokens.stream(split)
        assert stream[-1] == tokens.eot_id
        assert (stream == tokens.eot_id).sum() == stats[f"{split}_documents"]
        assert not (stream == tokens.sink_id).any()


def _grad_at_position_0(m, variant, x, sink_id):
    """The gradient reaching the input embedding of position 0 of every sequence (B,): the input side alone (the
    embedding is tied to the output layer, where every row gets gradients)."""
    held = {}

    def keep(module, inputs, out):
        out.retain_grad()
        held["embeds"] = out

    hook = m.get_input_embeddings().register_forward_hook(keep)
    try:
        train.loss_of(m.train(), variant, x, sink_id).backward()
    finally:
        hook.remove()
    return held["embeds"].grad[:, 0].abs().sum(-1)


def test_variants_differ_as_designed(run):
    folder, s, tokens = run
    stream = tokens.stream("train")
    x = data.batch(stream, 0, s.seed, 8, s.seq_len)  # (8, T)
    assert len(set(x[:, 0].tolist())) > 1  # cut at arbitrary offsets: no fixed first token
    models = {v: train.load_model(train.latest(folder, v)) for v in model.VARIANTS}
    # vanilla: reads the text as cut, no BOS or sink
    assert torch.equal(train.inputs("vanilla", x, tokens.sink_id), x)
    assert models["vanilla"].config.bos_token_id is None
    # sink token: at position 0 of every sequence, and learned
    ids = train.inputs("sink-token", x, tokens.sink_id)
    assert (ids[:, 0] == tokens.sink_id).all() and torch.equal(ids[:, 1:], x)
    assert models["sink-token"].config.bos_token_id == tokens.sink_id
    assert (_grad_at_position_0(models["sink-token"], "sink-token", x, tokens.sink_id) > 0).all()
    fresh = model.build("sink-token", s.shape, tokens.vocab_size, tokens.eot_id, tokens.sink_id, s.seed)
    trained = models["sink-token"].get_input_embeddings().weight[tokens.sink_id]
    assert not torch.equal(trained, fresh.get_input_embeddings().weight[tokens.sink_id])
    # zero sink: logits frozen at 0, softmax rows over the real keys sum to less than 1
    sinks = [m.sinks for m in models["zero-sink"].modules() if hasattr(m, "sinks")]
    assert len(sinks) == s.shape.num_layers
    assert all(not p.requires_grad and torch.equal(p, torch.zeros_like(p)) for p in sinks)
    probs = {}
    with torch.no_grad():
        train.loss_of(models["zero-sink"], "zero-sink", x, tokens.sink_id, probe=probs)
    for p in probs.values():  # (B, H, T, T + 1)
        assert p.shape[-1] == s.seq_len + 1
        rows = p[..., :-1].sum(-1)
        assert (rows < 1).all() and torch.allclose(rows + p[..., -1], torch.ones_like(rows))
    for variant in ("vanilla", "sink-token"):
        probs = {}
        with torch.no_grad():
            train.loss_of(models[variant], variant, x, tokens.sink_id, probe=probs)
        rows = probs[0].sum(-1)
        assert torch.allclose(rows, torch.ones_like(rows))


def test_training_attention_is_the_models_own(run):
    folder, s, tokens = run
    x = data.batch(tokens.stream("train"), 3, s.seed, 2, s.seq_len)
    for variant in model.VARIANTS:
        m = train.load_model(train.latest(folder, variant)).eval()
        ids = train.inputs(variant, x, tokens.sink_id)
        with torch.no_grad():
            fused = m(input_ids=ids).logits
            m.set_attn_implementation("eager")
            own = m(input_ids=ids).logits
        assert (fused - own).abs().max() < 1e-4, variant


def test_resumed_run_equals_uninterrupted(run, tmp_path):
    folder, s, _ = run
    other = tmp_path / "resumed"
    assert train.train(other, s, max_turns=4) == {"vanilla": 4, "sink-token": 2, "zero-sink": 2}
    assert train.train(other) == dict.fromkeys(model.VARIANTS, 4)  # a new call reads the saved settings
    for variant in model.VARIANTS:
        a = train.load_model(train.latest(folder, variant)).state_dict()
        b = train.load_model(train.latest(other, variant)).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), variant
        losses = [
            [r["loss"] for r in evaluate.read_jsonl(f / variant / "log.jsonl")] for f in (folder, other)
        ]
        assert losses[0] == losses[1] and len(losses[0]) == 4
    kept = sorted(p.name for p in (other / "vanilla").glob("step-*"))
    assert kept == ["step-2", "step-4"]  # the milestone keeps its weights, only the newest its optimizer
    assert not (other / "vanilla" / "step-2" / "trainer.pt").exists()


def test_bfloat16_compute_trains_and_resumes_exactly(run, tmp_path):
    folder, s, _ = run
    s = dataclasses.replace(s, compute="bfloat16", variants=("vanilla",))
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    train.train(whole, s)
    train.train(halves, s, max_turns=1)
    train.train(halves)
    a = train.load_model(train.latest(whole, "vanilla")).state_dict()
    b = train.load_model(train.latest(halves, "vanilla")).state_dict()
    assert all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)  # float32 master weights
    losses = {
        name: [r["loss"] for r in evaluate.read_jsonl(f / "vanilla" / "log.jsonl")]
        for name, f in (("float32", folder), ("bfloat16", whole))
    }
    # the same steps on the same data: rounding apart, not another run
    assert losses["bfloat16"] != losses["float32"]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.02)
    with pytest.raises(ValueError, match="compute must be one of"):
        dataclasses.replace(s, compute="float16")


@pytest.mark.parametrize("variant", model.VARIANTS)
def test_engine_streams_each_variant_like_the_oracle(run, variant):
    folder, _, tokens = run
    m = streamllm.prepare(train.load_model(train.latest(folder, variant)))
    text = [int(t) for t in tokens.stream("heldout")[:30]]
    ids = [tokens.sink_id, *text] if variant == "sink-token" else text
    for num_sinks in (0, 1):
        ref = oracle_logits(m, ids, num_sinks, 8 - num_sinks)
        config = StreamConfig(num_sinks=num_sinks, window=8 - num_sinks)
        got, _ = engine_logits(m, ids, config, chunk=5)
        assert (got - ref).abs().max() < 1e-4, num_sinks
        nll = torch.nn.functional.cross_entropy(ref[:-1], torch.tensor(ids[1:]), reduction="none")
        assert (streaming_nll(m, ids, config).nll - nll).abs().max() < 1e-4


def test_eval_and_status(run, tmp_path, capsys):
    folder, s, tokens = run
    report = evaluate.evaluate(folder, "cmd", tokens=60, cache=16, stride=4)
    assert [r[0] for r in report.csv_rows[::6]] == list(model.VARIANTS)
    configs = {"0+16", "1+15", "2+14", "4+12", "recompute", "4+12, recompute's tokens"}
    assert {r[3] for r in report.csv_rows} == configs
    paths = report.write(tmp_path)
    assert [p.suffix for p in paths] == [".csv", ".md", ".png"]
    assert "zero-sink" in paths[1].read_text()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STREAMLLM_HOME", str(folder.parents[2]))
        assert main(["pretrain", "status", "--run", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "zero-sink  checkpoint 4/4" in out


def test_logs_survive_a_line_cut_short(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed mid-line
    with train._appending(path) as f:
        f.write('{"step": 2, "loss": 1.5}\n')
    assert evaluate.read_jsonl(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


def test_cli_trains_and_resumes(run, capsys):
    folder, _, tokens = run
    home = folder.parents[2]
    args = [
        "pretrain",
        "train",
        "--run",
        "cli",
        "--data",
        str(tokens.folder),
        "--steps",
        "2",
        "--segment",
        "1",
    ]
    args += ["--size", "32,2,2,48", "--batch-size", "2", "--seq-len", "24", "--variants", "vanilla,zero-sink"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STREAMLLM_HOME", str(home))
        assert main([*args, "--max-turns", "1"]) == 0
        assert "steps done: {'vanilla': 1, 'zero-sink': 0}" in capsys.readouterr().out
        assert main(["pretrain", "train", "--run", "cli", "--steps", "9"]) == 0
        captured = capsys.readouterr()
        assert "the ones given are ignored" in captured.err
        assert "steps done: {'vanilla': 2, 'zero-sink': 2}" in captured.out
        assert main(["pretrain", "train", "--run", "cli", "--size", "1,2"]) == 0  # settings saved: not parsed


@pytest.mark.parametrize(
    "bad", [["--lr", "-1"], ["--lr", "nan"], ["--weight-decay", "-0.5"], ["--size", "1,2"]]
)
def test_cli_refuses_bad_settings(run, capsys, bad):
    folder, _, tokens = run
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STREAMLLM_HOME", str(folder.parents[2]))
        args = ["pretrain", "train", "--run", "bad", "--data", str(tokens.folder), *bad]
        assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("streamllm: error:"), err
    assert not (folder.parent / "bad").exists()


def test_sink_heads_follow_the_probe(run, monkeypatch):
    folder, s, tokens = run
    x = train.probe_batch(s, tokens)
    res = train.probe(train.load_model(train.latest(folder, "zero-sink")), "zero-sink", x, tokens.sink_id)
    for key, per_head in (("pos0", "pos0_heads"), ("sink_column", "sink_heads")):
        for mean, heads in zip(res[key], res[per_head], strict=True):
            assert len(heads) == s.shape.num_heads and abs(sum(heads) / len(heads) - mean) < 1e-4
    kept = {v: [n for n, _ in train.kept_checkpoints(folder, v)] for v in model.VARIANTS}
    assert all(steps and steps[-1] == train.steps_done(folder, v) for v, steps in kept.items())
    heads = s.shape.num_layers * s.shape.num_heads
    for threshold, counted in ((0.0, heads), (1.0, 0)):
        monkeypatch.setattr(evaluate, "SINK_HEAD", threshold)
        history = evaluate.head_history(folder, s, tokens)
        assert {v: [r["step"] for r in rows] for v, rows in history.items()} == kept
        for variant, rows in history.items():
            assert all(r["pos0_heads"][0] == counted for r in rows)
            assert all(("sink_heads" in r) == (variant == "zero-sink") for r in rows)

"""Every experiment end to end at its reduced size (``--quick``) on the real model, outputs checked for content."""

import csv
import json

import pytest

from streamllm.data import DataError
from streamllm.experiments import EXPERIMENTS, Context
from streamllm.experiments.chat import degenerate, load_questions
from streamllm.experiments.streameval import line_text, query_text, score

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def outputs(real, tmp_path_factory):
    """Runs each experiment once, on demand: name -> (folder, report)."""
    model, tokenizer = real
    done = {}

    def get(name):
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            ctx = Context(
                model, tokenizer, "smollm2-135m", f"streamllm experiment {name} --quick", quick=True
            )
            report = EXPERIMENTS[name](ctx)
            report.write(out)
            done[name] = (out, report)
        return done[name]

    return get


def read(out, name):
    with open(out / f"{name}.csv") as f:
        rows = list(csv.DictReader(f))
    md = (out / f"{name}.md").read_text()
    png = (out / f"{name}.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert f"streamllm experiment {name} --quick" in md and "Machine:" in md
    return rows, md


def table_rows(report):
    return {row[0]: row for row in report.csv_rows}


def test_methods(outputs):
    out, report = outputs("methods")
    rows, md = read(out, "methods")
    assert {r["method"] for r in rows} == {"dense", "window", "sink", "sink + memory", "recompute (sampled)"}
    for name in ("dense", "window", "sink", "sink + memory", "recompute"):
        assert f"| {name} |" in md
    mean = {m: sum(float(r["mean_nll"]) for r in rows if r["method"] == m) for m in ("window", "sink")}
    assert mean["window"] > mean["sink"]  # evicting the first tokens hurts (paper Fig. 3)


def test_sinks(outputs):
    out, report = outputs("sinks")
    rows, md = read(out, "sinks")
    ppl = {r["config"]: float(r["perplexity"]) for r in rows}
    assert list(ppl) == ["0+64", "1+63", "2+62", "4+60", "8+56"]
    assert ppl["0+64"] > ppl["4+60"]  # a cache with no sinks is window attention (paper Table 2)


def test_cache_size(outputs):
    out, _ = outputs("cache-size")
    rows, _ = read(out, "cache-size")
    assert [r["config"] for r in rows] == ["4+28", "4+60"]
    assert all(1 < float(r["perplexity"]) < 1000 for r in rows)


def test_newline_sinks(outputs):
    out, _ = outputs("newline-sinks")
    rows, _ = read(out, "newline-sinks")
    ppl = [float(r["perplexity"]) for r in rows]
    assert len(ppl) == 3
    assert ppl[0] > ppl[1] and ppl[0] > ppl[2]  # window is worst; newlines still act as sinks


def test_positions(outputs):
    out, _ = outputs("positions")
    rows, md = read(out, "positions")
    first = {r["config"]: float(r["mean_nll"]) for r in rows if r["first_token"] == "1"}
    last = {r["config"]: float(r["mean_nll"]) for r in rows if r["last_token"] == "399"}
    assert set(first) == {"sink, cache positions", "sink, text positions", "window", "dense"}
    # Before eviction the two position modes are the same computation; after it they are not.
    assert first["sink, cache positions"] == pytest.approx(first["sink, text positions"], abs=1e-4)
    assert last["sink, cache positions"] != pytest.approx(last["sink, text positions"], abs=1e-4)


def test_long(outputs):
    out, _ = outputs("long")
    rows, md = read(out, "long")
    assert [int(r["tokens"]) for r in rows] == [501, 1001, 1501, 2001, 2501, 3000]
    assert all(1 < float(r["segment_ppl"]) < 1000 and float(r["rss_mb"]) > 100 for r in rows)
    assert "RSS, first / last segment" in md


def test_attention_map(outputs, real):
    out, _ = outputs("attention-map")
    rows, md = read(out, "attention-map")
    assert len(rows) == real[0].config.num_hidden_layers
    share = [float(r["share_token0"]) for r in rows]
    assert all(0 <= s <= float(r["share_first4"]) <= 1 for s, r in zip(share, rows, strict=True))
    assert max(share) > 0.25  # the first token is a sink in this model's upper layers


def test_streameval(outputs):
    out, _ = outputs("streameval")
    rows, md = read(out, "streameval")
    methods = ["sink", "dense", "memory", "memory-content", "memory-oracle"]
    by = {m: [r for r in rows if r["method"] == m] for m in methods}
    assert len(rows) == 30 and all(len(v) == 6 for v in by.values())  # 2 rounds x 3 distances each
    # Every method is asked the same questions about the same lines.
    asked = [(r["lines_back"], r["expected"]) for r in by["sink"]]
    assert all([(r["lines_back"], r["expected"]) for r in v] == asked for v in by.values())
    inside = [r for r in by["sink"] if r["in_cache"] == "True"]
    outside = [r for r in by["sink"] if r["in_cache"] == "False"]
    assert inside and outside
    assert not any(r["correct"] == "True" for r in outside)  # without memory, an evicted line is gone
    for r in rows:
        assert (r["correct"] == "True") == score(r["answer"], r["expected"])
    for m in methods:
        assert f"| {m} |" in md
    assert all(r["recalled"] == "" for r in by["sink"] + by["dense"])  # no memory, nothing recalled

    def shares(m):
        return [float(r["recalled"]) for r in by[m] if r["in_cache"] == "False" and r["recalled"]]

    assert shares("memory") and all(0 <= s <= 1 for s in shares("memory"))
    assert shares("memory-oracle") and all(s == 1.0 for s in shares("memory-oracle"))  # forced in
    assert all(0 <= s <= 1 for s in shares("memory-content"))
    assert "share of memory layers that recalled the value" in md


def test_streameval_recall_share():
    from types import SimpleNamespace

    from streamllm.config import MemoryConfig, StreamConfig
    from streamllm.experiments.streameval import value_recalled

    config = StreamConfig(num_sinks=4, window=60, memory=MemoryConfig(block_size=16))
    layers = {i: SimpleNamespace(selected=sel) for i, sel in enumerate([[0, 2], [1], [3, 5], [2]])}
    memory = SimpleNamespace(layers=layers)
    # text positions 36..40 are in block 2 (tokens 36..51): layers 0 and 3 recalled it
    assert value_recalled(memory, config, 36, 41) == 0.5
    # 30..40 reach back into block 1 too: layer 1 joins
    assert value_recalled(memory, config, 30, 41) == 0.75


def test_chat(outputs):
    out, _ = outputs("chat")
    rows, md = read(out, "chat")
    assert [r["method"] for r in rows] == ["dense"] * 6 + ["window"] * 6 + ["sink"] * 6
    assert all(r["status"] == "ok" and int(r["generated"]) > 0 for r in rows)
    sink = [r for r in rows if r["method"] == "sink"]
    assert int(sink[-1]["tokens_streamed"]) > int(sink[-1]["cache_length"]) == 64  # far past the cache
    assert "| sink | 6 | 0 | 0 |" in md


def test_sampling(outputs):
    from streamllm.experiments.sampling import SETTINGS, right

    out, _ = outputs("sampling")
    rows, md = read(out, "sampling")
    parts = ["chat"] * 4 + ["facts"] * 3
    assert [(r["sampling"], r["part"]) for r in rows] == [(name, part) for name in SETTINGS for part in parts]
    assert all(int(r["generated"]) > 0 and r["finish"] in ("stop", "length") for r in rows)
    assert md.count("(the chat default)") == 1  # the default is one of the settings measured
    assert all((r["degenerate"] or None) == degenerate(r["reply"]) for r in rows)
    greedy_facts = [r for r in rows if r["sampling"] == "greedy" and r["part"] == "facts"]
    assert greedy_facts[0]["right"] == "True"  # the capital of France
    assert f"| greedy | 4 | {sum(bool(r['degenerate']) for r in rows[:4])} |" in md
    assert right("It is Paris.", ("paris",)) and not right("Parisian", ("paris",))
    assert right("7 days", ("7",)) and not right("1776", ("7",))


def test_streameval_scoring():
    assert score("40317>", "40317")
    assert score(" 40317 >", "40317")
    assert score("40317", "40317")  # cut off before the closing bracket
    assert not score("4031>", "40317")
    assert not score("403170>", "40317")
    assert not score("40317 or so", "40317")
    assert not score("", "40317")
    assert not score("line 3", "40317")
    assert line_text(3, "40317") == "line 3: REGISTER_CONTENT is <40317>\n"
    assert query_text(3).endswith("? A: line 3: REGISTER_CONTENT is <")


def test_degenerate_replies():
    assert degenerate("") == "empty"
    assert degenerate("  \n ") == "empty"
    assert degenerate("the cat sat on the mat " * 6) == "repetitive"
    assert degenerate("Water them every morning, and move the pots into the shade if it gets hot.") is None


def test_questions_file(tmp_path):
    assert len(load_questions(None)) == 10  # our own bundled sample: 5 questions of 2 turns
    good = tmp_path / "q.jsonl"
    good.write_text(json.dumps({"question_id": 7, "turns": ["a", "b"]}) + "\n")
    assert load_questions(good) == [(7, "a"), (7, "b")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 7}\n')
    with pytest.raises(DataError, match="line 1"):
        load_questions(bad)


def test_passkey(outputs):
    out, report = outputs("passkey")
    rows, md = read(out, "passkey")
    methods = [r["method"] for r in rows]
    assert methods == [m for m in ["sink", "memory", "memory-attention", "dense"] for _ in range(3)]
    right = {(r["method"], r["door"]): r["right"] == "True" for r in rows}
    assert not any(right["sink", d] for d in "123")  # every key left the 4+252 cache before the questions
    shares = {(r["method"], r["door"]): r["key_recalled"] for r in rows}
    assert all(float(shares["memory", d]) == 1.0 for d in "123")  # every layer recalled each key's block,
    assert any(right["memory", d] for d in "123")  # and the model read at least one of them back
    assert shares["sink", "1"] == "" and "Selection and reading told apart" in md
    assert "the key's block was recalled by" in md and "Key depths" in md


def test_recall(outputs):
    out, report = outputs("recall")
    rows, md = read(out, "recall")
    assert [r["method"] for r in rows] == [
        m for m in ["sink", "memory", "memory-attention", "dense"] for _ in range(5)
    ]
    right = {
        m: sum(r["right"] == "True" for r in rows if r["method"] == m) for m in ("sink", "memory", "dense")
    }
    assert right["sink"] == 0  # every fact left the 4+252 cache before the questions
    assert (
        right["memory"] >= 2 and right["dense"] >= 2
    )  # memory brings facts back, as dense attention sees them
    assert "Facts recalled" in md and "| memory |" in md


def test_memory(outputs):
    out, report = outputs("memory")
    rows, md = read(out, "memory")
    assert [r["config"] for r in rows] == [
        "sink",
        "sink + memory, cache positions",
        "sink + memory, fixed distance",
    ]
    ppls = [float(r["perplexity"]) for r in rows]
    assert ppls[1] != ppls[0] and ppls[2] != ppls[1]  # memory is attended, and the rules differ
    assert all(p < 2 * ppls[0] for p in ppls)  # and it does not wreck the stream

"""The ``streamllm`` command as a user runs it: a real process, real model, real files."""

import json

import pytest
from cli_helpers import assert_one_line_error, run, run_here

from streamllm.data import shakespeare_dir
from streamllm.defaults import choose


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("")
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (d / "script.jsonl").write_text('{"content": "hi"}\nnot json\n')
    return d


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["generate", "--prompt", "hi", "--window", "0"], "--window"),
        (["generate", "--prompt", "hi", "--num-sinks", "-1"], "--num-sinks"),
        (["generate", "--prompt", "hi", "--window", "abc"], "--window"),
        (["generate", "--prompt", "hi", "--model", "no-such-model"], "unknown model"),
        (["generate", "--prompt", "hi", "--model", "/no/such/file.gguf"], "not found"),
        (["generate", "--prompt", "   "], "empty"),
        (["generate", "--prompt", "hi", "--temperature", "-1"], "temperature"),
        (["perplexity", "--text", "/no/such/file.txt"], "not found"),
        (["perplexity", "--text", "{d}/empty.txt"], "empty"),
        (["perplexity", "--text", "{d}/latin1.txt"], "UTF-8"),
        (["chat", "--script", "{d}/script.jsonl"], "not valid JSON"),
        (["models", "pull", "nope"], "unknown model"),
        (["perplexity", "--text", "{d}/script.jsonl", "--positions", "sideways"], "--positions"),
        (["generate", "--prompt", "hi", "--decode", "int3"], "--decode"),
        (["perplexity", "--text", "{d}/script.jsonl", "--csv", "{d}/empty.txt"], "--overwrite"),
        (["perplexity", "--text", "{d}/script.jsonl", "--csv", "/no/such/dir/x.csv"], "does not exist"),
        (["experiment", "nope", "--out", "{d}"], "invalid choice"),
        (["experiment", "sinks", "--out", "{d}/empty.txt"], "is a file"),
        (["experiment", "chat", "--out", "{d}/o", "--questions", "/no/such.jsonl"], "not found"),
        (["experiment", "passkey", "--out", "{d}/o", "--lengths", "4096,abc"], "--lengths"),
        (["experiment", "passkey", "--out", "{d}/o", "--methods", "sink,magic"], "--methods"),
        (["experiment", "streameval", "--out", "{d}/o", "--methods", "sink,recompute"], "not recompute"),
        (["experiment", "sinks", "--out", "{d}/o", "--methods", "sink"], "--methods applies to"),
        (["experiment", "streameval", "--out", "{d}/o", "--memory-blocks", "0"], "blocks must be >= 1"),
        (["generate", "--prompt", "hi", "--memory-block", "0"], "block_size must be >= 1"),
        (["generate", "--prompt", "hi", "--memory-ram", "-5"], "ram_mb must be >= 1"),
        (
            ["generate", "--prompt", "hi", "--memory-block", "65536", "--memory-ram", "1"],
            "smaller than one block",
        ),
        (["generate", "--prompt", "hi", "--memory", "--method", "window"], "sink method"),
        (["generate", "--prompt", "hi", "--memory-dir", "/no/such/dir"], "does not exist"),
        (["generate", "--prompt", "hi", "--memory-positions", "text"], "--memory-positions"),
        (["serve", "--memory", "--memory-refresh", "0"], "refresh must be >= 1"),
        (["serve", "--no-memory", "--memory-blocks", "8"], "leave out --memory-blocks"),
        (["chat", "--no-memory", "--memory-select", "hybrid"], "leave out --memory-select"),
        (["chat", "--memory", "--method", "recompute"], "sink method"),
    ],
)
def test_bad_input_gets_one_line_error(args, needle, bad_files, capsys):
    """In this process, through the command's ``main``; the real process's own handling is checked once below."""
    result = run_here(capsys, *[a.format(d=bad_files) for a in args])
    assert_one_line_error(result, needle)


@pytest.mark.parametrize(
    ("args", "memory"),
    [
        (["chat"], True),  # on by default in chat and serve
        (["chat", "--no-memory"], False),
        (["chat", "--method", "window"], False),  # where it does not apply, not an error
        (["chat", "--positions", "text"], False),
        (["serve"], True),
        (["serve", "--no-memory"], False),
        (["generate", "--prompt", "hi"], False),  # opt-in elsewhere
        (["generate", "--prompt", "hi", "--memory-blocks", "2"], True),
    ],
)
def test_memory_is_on_by_default_in_chat_and_serve(args, memory):
    from streamllm.cli import build_parser
    from streamllm.cli.common import memory_config

    assert (memory_config(build_parser().parse_args(args)) is not None) == memory


def test_serve_shares_one_memory_budget_among_its_sessions():
    from streamllm.cli import build_parser
    from streamllm.cli.serve import SERVER_MEMORY_RAM_MB, server_config

    def ram(*args):
        return server_config(build_parser().parse_args(["serve", *args])).stream.memory.ram_mb

    assert ram() == SERVER_MEMORY_RAM_MB // 16  # --max-sessions 16
    assert ram("--max-sessions", "4") == SERVER_MEMORY_RAM_MB // 4
    assert ram("--max-sessions", "4", "--memory-ram", "300") == 300  # given: per session, as everywhere
    assert ram("--max-sessions", "100000") == 64  # a floor: a block of a larger model still fits


def test_bad_input_in_a_real_process(bad_files):
    assert_one_line_error(run("perplexity", "--text", f"{bad_files}/latin1.txt"), "UTF-8")


@pytest.mark.real
def test_perplexity_json(tmp_path):
    text = shakespeare_dir() / "hamlet_gut.txt"
    result = run("perplexity", "--text", str(text), "--max-tokens", "600", "--window", "124", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"ppl", "tokens", "method", "num_sinks", "window", "tok_per_s", "peak_rss_mb"} <= summary.keys()
    assert summary["tokens"] == 600 and summary["method"] == "sink" and 1 < summary["ppl"] < 200
    auto = choose("smollm2-135m")  # the default path on this CPU, and the one the summary names
    assert summary["path"]["dtype"] == auto.dtype and summary["path"]["decode"] == auto.decode
    assert summary["path"]["why"] == auto.why


@pytest.mark.real
def test_perplexity_csv_rows_and_overwrite(tmp_path, capsys):
    text = shakespeare_dir() / "hamlet_gut.txt"
    out = tmp_path / "nll.csv"
    args = ("perplexity", "--text", str(text), "--max-tokens", "300", "--window", "60", "--csv", str(out))
    result = run(*args, "--json")
    assert result.returncode == 0, result.stderr
    rows = [line.split(",") for line in out.read_text().splitlines()]
    assert rows[0] == ["index", "nll", "running_ppl", "cache_length", "rss_mb"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 300))
    assert [int(r[3]) for r in rows[1:]] == [min(i, 64) for i in range(1, 300)]
    assert float(rows[-1][2]) == pytest.approx(json.loads(result.stdout.splitlines()[-1])["ppl"], rel=1e-3)
    assert all(float(r[4]) > 100 for r in rows[1:])
    before = out.read_text()
    assert_one_line_error(run_here(capsys, *args), "--overwrite")
    assert out.read_text() == before  # refused without touching the file
    assert run_here(capsys, *args, "--overwrite", "--max-tokens", "100").returncode == 0
    assert len(out.read_text().splitlines()) == 100


@pytest.mark.real
def test_experiment_command_writes_outputs_and_refuses_to_overwrite(tmp_path, capsys):
    result = run("experiment", "newline-sinks", "--quick", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["newline-sinks.csv", "newline-sinks.md", "newline-sinks.png"]
    assert "streamllm experiment newline-sinks --quick --out" in (tmp_path / "newline-sinks.md").read_text()
    assert_one_line_error(
        run_here(capsys, "experiment", "newline-sinks", "--quick", "--out", str(tmp_path)), "--overwrite"
    )


@pytest.mark.real
def test_generate_with_4_bit_decoding():
    result = run(
        "generate",
        "--prompt",
        "The sea",
        "--window",
        "28",
        "--decode",
        "int4",
        "--ignore-eos",
        "--max-new-tokens",
        "40",
        "--stats",
    )
    assert result.returncode == 0, result.stderr
    assert "cache 32/32" in result.stderr and "40 tokens" in result.stderr


@pytest.mark.real
def test_generate_runs_past_the_cache():
    result = run(
        "generate",
        "--prompt",
        "The sea",
        "--window",
        "28",
        "--ignore-eos",
        "--max-new-tokens",
        "120",
        "--stats",
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) > 20
    assert "cache 32/32" in result.stderr and "120 tokens" in result.stderr
    auto = choose("smollm2-135m")
    assert f"{auto.dtype}, {auto.decode} decode ({auto.why})]" in result.stderr


@pytest.mark.real
def test_chat_script_and_transcript(tmp_path):
    script = tmp_path / "turns.jsonl"
    script.write_text(
        '{"content": "What is the capital of France?"}\n{"content": "/stats"}\n{"content": "Thank you!"}\n'
    )
    transcript = tmp_path / "out.jsonl"
    result = run(
        "chat",
        "--script",
        str(script),
        "--transcript",
        str(transcript),
        "--window",
        "60",
        "--max-new-tokens",
        "40",
        "--temperature",
        "0",
    )
    assert result.returncode == 0, result.stderr
    assert "[turns 1, streamed" in result.stdout and "sampling greedy" in result.stdout
    rows = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert [r["user"] for r in rows] == ["What is the capital of France?", "Thank you!"]
    assert "Paris" in rows[0]["assistant"] and rows[1]["cache_length"] <= 64


def test_models_lists_builtins(capsys):
    result = run_here(capsys, "models")
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == ["smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"]
    assert "Qwen2 architecture" in result.stdout and "license: Apache-2.0" in result.stdout
    assert "270M parameters" in result.stdout and "license: Gemma terms of use" in result.stdout


def test_every_builtin_pins_its_full_checksum():
    import re

    from streamllm.models import BUILTINS

    assert all(re.fullmatch(r"[0-9a-f]{64}", m.sha256) for m in BUILTINS.values())


@pytest.mark.real
def test_generate_with_memory_reports_it(tmp_path):
    """A prompt far past a small cache: the memory fills, spills to its folder past the budget, and --stats
    says so."""
    prompt = (shakespeare_dir() / "hamlet_gut.txt").read_text()[:6000]
    result = run(
        "generate",
        "--prompt",
        prompt,
        "--window",
        "124",
        "--max-new-tokens",
        "8",
        "--stats",
        "--memory-block",
        "16",
        "--memory-ram",
        "16",
        "--memory-dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    stats = result.stderr.strip().splitlines()[-1]
    assert "memory " in stats and " blocks (" in stats and "MB disk" in stats, stats
    blocks = int(stats.split("memory ")[1].split(" blocks")[0])
    on_disk = int(stats.split(" MB disk")[0].split()[-1])
    assert blocks > 10 and on_disk > 0, stats  # past the 16 MiB budget, blocks went to the file
    assert list(tmp_path.iterdir()) == []  # the memory file went with the process

"""A stream starts the way the model was trained to start: with BOS when the tokenizer adds one, never twice.

SmolLM2's own tokenizer adds no BOS; loaded with ``add_bos_token=True`` it behaves as Gemma's and Llama 3's do
(its BOS is ``<|im_start|>``, which its chat template writes first: the case of a template that already starts
with BOS)."""

import pytest
from transformers import AutoTokenizer

from streamllm.models import model_dir
from streamllm.runtime.generate import Sampling, stream_generate
from streamllm.runtime.stream import Stream
from streamllm.runtime.tokens import bos_prefix, encode
from streamllm.server.prompts import Renderer


@pytest.fixture(scope="module")
def tokenizers(real):
    folder = model_dir("smollm2-135m")
    return AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder, add_bos_token=True)


def test_bos_only_where_the_tokenizer_adds_it(tokenizers):
    plain, with_bos = tokenizers
    assert bos_prefix(plain) == [] and bos_prefix(with_bos) == [with_bos.bos_token_id]
    text = plain.encode("The sea", add_special_tokens=False)
    assert encode(plain, "The sea", first=True) == text
    assert encode(with_bos, "The sea", first=True) == [with_bos.bos_token_id, *text]
    assert encode(with_bos, "The sea", first=False) == text  # only a stream's first text
    assert encode(with_bos, "The sea", first=True, bos=False) == text


def test_a_template_that_writes_bos_does_not_get_a_second(tokenizers):
    _, with_bos = tokenizers
    rendered = with_bos.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    ids = encode(with_bos, rendered, first=True)
    assert ids[0] == with_bos.bos_token_id != ids[1]
    assert ids == with_bos.encode(rendered, add_special_tokens=False)


def test_stream_generate_starts_a_stream_with_bos_once(real, tokenizers):
    model, _ = real
    _, with_bos = tokenizers
    prompt = with_bos.encode("Once upon a time", add_special_tokens=False)
    sampling = Sampling(max_new_tokens=3, ignore_eos=True)
    for bos, expected in ((True, len(prompt) + 1), (False, len(prompt))):
        stream = Stream(model)
        list(stream_generate(model, with_bos, "Once upon a time", sampling, stream=stream, bos=bos))
        assert stream.tokens_seen == expected + 3
    # Continuing the stream adds no second BOS.
    before = stream.tokens_seen
    list(stream_generate(model, with_bos, " and then", sampling, stream=stream))
    assert stream.tokens_seen == before + len(with_bos.encode(" and then", add_special_tokens=False)) + 3


def test_the_server_starts_a_session_with_bos(tokenizers):
    _, with_bos = tokenizers
    bos = with_bos.bos_token_id
    assert Renderer(with_bos).encode("Hello", first=True)[0] == bos
    assert Renderer(with_bos).encode("Hello", first=False)[0] != bos
    assert Renderer(with_bos, bos=False).encode("Hello", first=True)[0] != bos

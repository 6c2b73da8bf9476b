"""Both halves as real processes on loopback with tiny real models: output equals the target model alone."""

import concurrent.futures

import pytest
from splitspec_client import Client

PROMPTS = [
    "The quick brown fox",
    "def wrap(text, width=70):",
    "Beautiful is better than ugly.",
]


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("target", ["target_unrelated", "target_related"])
def test_greedy_equals_target_with_a_rejecting_draft(request, reference, target, prompt, k):
    with Client(request.getfixturevalue(target).address, timeout=60) as client:
        result = client.generate(prompt, max_new_tokens=64, num_speculative_tokens=k, ignore_eos=True)
    assert list(result.token_ids) == reference(prompt, 64)
    assert result.finish_reason == "length"
    stats = result.stats
    assert stats.draft_server and not stats.fallback_reason
    assert stats.num_drafts > 0 and stats.num_draft_tokens > 0
    assert stats.num_accepted_tokens < stats.num_draft_tokens  # rejections happened and were rolled back
    assert stats.generated_tokens == 64
    # Every round emits accepted + 1 tokens.
    assert stats.num_accepted_tokens + stats.rounds == 64


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_target_with_self_draft(target_self, reference, prompt, k):
    with Client(target_self.address, timeout=60) as client:
        result = client.generate(prompt, max_new_tokens=64, num_speculative_tokens=k, ignore_eos=True)
    assert list(result.token_ids) == reference(prompt, 64)
    stats = result.stats
    assert stats.acceptance_rate == 1.0
    assert stats.num_accepted_tokens == stats.num_draft_tokens
    # Full blocks of k + 1 tokens, then a last shorter block that stops exactly at max_new_tokens.
    assert stats.rounds == -(-64 // (k + 1))
    assert stats.mean_accepted_length == pytest.approx(1 + stats.num_accepted_tokens / stats.num_drafts)
    assert stats.num_accepted_tokens_per_pos[0] == stats.num_drafts
    # Every guess of a self-draft is right: all blocks after the first were drafted ahead, none went stale.
    assert stats.num_drafts_ahead == stats.num_drafts - 1 and stats.num_stale_drafts == 0


def test_eos_stops_generation_like_generate(target_unrelated, reference):
    prompt = PROMPTS[0]
    expected = reference(prompt, 64, ignore_eos=False)
    with Client(target_unrelated.address, timeout=60) as client:
        result = client.generate(prompt, max_new_tokens=64, num_speculative_tokens=3)
    assert list(result.token_ids) == expected
    assert result.finish_reason == ("eos_token" if expected[-1] == 2 else "length")


def test_fallback_without_draft_server_gives_same_output(target_alone, reference):
    with Client(target_alone.address, timeout=60) as client:
        result = client.generate(PROMPTS[1], max_new_tokens=64, ignore_eos=True)
        info = client.info()
    assert list(result.token_ids) == reference(PROMPTS[1], 64)
    assert result.stats.num_drafts == 0 and result.stats.draft_server == ""
    assert "no draft server configured" in result.stats.fallback_reason
    assert info.draft_servers == ()


def test_stream_yields_the_same_tokens_and_text(target_unrelated, reference):
    prompt = PROMPTS[2]
    with Client(target_unrelated.address, timeout=60) as client:
        chunks = list(client.stream(prompt, max_new_tokens=48, num_speculative_tokens=4, ignore_eos=True))
        unary = client.generate(prompt, max_new_tokens=48, num_speculative_tokens=4, ignore_eos=True)
    streamed_ids = [t for chunk in chunks for t in chunk.token_ids]
    assert streamed_ids == reference(prompt, 48) == list(unary.token_ids)
    assert "".join(chunk.text for chunk in chunks) == unary.text
    assert unary.text == reference.tokenizer.decode(unary.token_ids, skip_special_tokens=True)
    assert len(chunks) > 1
    assert all(chunk.finish_reason is None for chunk in chunks[:-1])
    assert chunks[-1].finish_reason == "length" and chunks[-1].stats.generated_tokens == 48


def test_stop_string_cuts_text_and_ends_generation(target_unrelated, reference):
    prompt = PROMPTS[0]
    full_ids = reference(prompt, 40)
    full_text = reference.tokenizer.decode(full_ids, skip_special_tokens=True)
    stop = full_text[10:13]
    with Client(target_unrelated.address, timeout=60) as client:
        result = client.generate(prompt, max_new_tokens=40, ignore_eos=True, stop=[stop])
        chunks = list(client.stream(prompt, max_new_tokens=40, ignore_eos=True, stop=[stop]))
    assert result.finish_reason == "stop_sequence"
    assert result.text == full_text[: full_text.find(stop)]
    assert list(result.token_ids) == full_ids[: len(result.token_ids)] and len(result.token_ids) < 40
    assert "".join(c.text for c in chunks) == result.text  # nothing past the stop string was ever streamed


def test_a_stop_string_in_the_last_incomplete_character_is_the_finish_reason(target_alone, reference):
    """Text ending in an incomplete character (a lone byte, U+FFFD) is held back until the end; a stop string found in
    it then cuts the text, and the finish reason says so (it said "length" over a cut text)."""
    decode = reference.tokenizer.decode
    greedy = reference(PROMPTS[0], 16)
    # The first completion that ends inside a character (this tiny model emits lone bytes).
    end = next(n for n in range(1, 17) if decode(greedy[:n]).endswith("\ufffd"))
    assert "\ufffd" not in decode(greedy[: end - 1])
    with Client(target_alone.address, timeout=60) as client:
        result = client.generate(PROMPTS[0], max_new_tokens=end, ignore_eos=True, stop=["\ufffd"])
        chunks = list(client.stream(PROMPTS[0], max_new_tokens=end, ignore_eos=True, stop=["\ufffd"]))
    assert (list(result.token_ids), result.finish_reason) == (greedy[:end], "stop_sequence")
    assert result.text == "".join(c.text for c in chunks) == decode(greedy[:end])[:-1]
    assert chunks[-1].finish_reason == "stop_sequence"


def test_a_prompt_cut_inside_a_character_gets_the_whole_character(target_alone, prompt_cut_inside_a_character):
    """Continuing a completion that ended inside a character (its text ends in U+FFFD): the token that completes the
    character renders all of it, as in vLLM. It was dropped: the continuation's text began after it."""
    prompt_token_ids, character = prompt_cut_inside_a_character
    with Client(target_alone.address, timeout=60) as client:
        result = client.generate(prompt_token_ids, max_new_tokens=8, ignore_eos=True)
        chunks = list(client.stream(prompt_token_ids, max_new_tokens=8, ignore_eos=True))
        stopped = client.generate(prompt_token_ids, max_new_tokens=8, ignore_eos=True, stop=[character])
    assert result.text.startswith(character) and "".join(c.text for c in chunks) == result.text
    assert (stopped.text, stopped.finish_reason, len(stopped.token_ids)) == ("", "stop_sequence", 1)


def test_an_eos_the_tokenizer_does_not_count_special_adds_no_text(model_dirs, log_dir, tmp_path, reference):
    """The EOS that ends a completion is in its token ids, not in its text (as in vLLM), also when the tokenizer does
    not count it special (DeepSeek-Coder's <|EOT|>), where skip_special_tokens would keep it."""
    from servers import start_target
    from tiny_models import copy_with_eos

    decode = reference.tokenizer.decode
    greedy = reference(PROMPTS[1], 16)
    eos = next(t for t in greedy[2:] if decode([t]).strip().isprintable())  # a plain token that shows as text
    expected = greedy[: greedy.index(eos) + 1]
    directory = copy_with_eos(model_dirs["target"], tmp_path / "plain-eos", eos)
    target = start_target(directory, log_dir, "target-plain-eos", [])
    try:
        with Client(target.address, timeout=60) as client:
            result = client.generate(PROMPTS[1], max_new_tokens=16)
            chunks = list(client.stream(PROMPTS[1], max_new_tokens=16))
    finally:
        assert target.stop() == 0
    assert (list(result.token_ids), result.finish_reason) == (expected, "eos_token")
    assert result.text == "".join(c.text for c in chunks) == decode(expected[:-1])
    assert [t for c in chunks for t in c.token_ids] == expected and chunks[-1].finish_reason == "eos_token"


def test_eight_concurrent_clients_each_get_their_own_output(target_unrelated, reference):
    prompts = [f"{p} {i}" for i, p in enumerate(PROMPTS * 3)][:8]
    expected = {p: reference(p, 40) for p in prompts}

    def run(prompt):
        with Client(target_unrelated.address, timeout=120) as client:
            return prompt, client.generate(prompt, max_new_tokens=40, num_speculative_tokens=3, ignore_eos=True)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, prompts))
    for prompt, result in results:
        assert list(result.token_ids) == expected[prompt], prompt
        assert result.stats.draft_server


def test_sampling_with_a_seed_is_reproducible(target_unrelated):
    params = dict(max_new_tokens=48, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    with Client(target_unrelated.address, timeout=60) as client:
        first = client.generate(PROMPTS[0], **params)
        second = client.generate(PROMPTS[0], **params)
        other_seed = client.generate(PROMPTS[0], **{**params, "seed": 99})
    assert list(first.token_ids) == list(second.token_ids)
    assert first.token_ids != other_seed.token_ids
    assert first.stats.num_drafts > 0


def test_info_reports_connected_draft(target_unrelated, unrelated_draft):
    with Client(target_unrelated.address, timeout=10) as client:
        info = client.info()
    assert info.device == "cpu" and info.dtype == "float32"
    [draft] = info.draft_servers
    assert draft.address == unrelated_draft.address and draft.connected and draft.error == ""


def test_cli_generate_against_real_servers(target_related, reference):
    import json
    import subprocess
    import sys

    prompt = PROMPTS[0]
    completed = subprocess.run(
        [sys.executable, "-m", "splitspec_client", "generate", prompt, "--target", target_related.address,
         "--max-new-tokens", "24", "--ignore-eos", "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    output = json.loads(completed.stdout)
    assert output["token_ids"] == reference(prompt, 24)
    assert output["finish_reason"] == "length" and output["stats"]["num_drafts"] > 0


@pytest.mark.parametrize("no_stream", [[], ["--no-stream"]])
def test_cli_prints_what_its_output_encoding_cannot_hold_as_question_marks(target_alone, reference, no_stream):
    """A completion's characters past stdout's encoding (here ASCII; a Windows code page, a Latin-1 locale) print as
    "?": the CLI died with UnicodeEncodeError in the middle of the completion."""
    import os
    import subprocess
    import sys

    text = reference.tokenizer.decode(reference(PROMPTS[0], 24))
    assert not text.isascii()  # this tiny model emits lone bytes: U+FFFD
    completed = subprocess.run(
        [sys.executable, "-m", "splitspec_client", "generate", PROMPTS[0], "--target", target_alone.address,
         "--max-new-tokens", "24", "--ignore-eos", *no_stream],
        capture_output=True, timeout=60, env={**os.environ, "PYTHONIOENCODING": "ascii"},
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == text.encode("ascii", "replace") + b"\n"
    assert b"[length] 24 tokens" in completed.stderr


@pytest.mark.parametrize("module", ["draft_server", "target_server"])
def test_server_help_explains_every_flag(module):
    import subprocess
    import sys

    completed = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60,
                               check=True)
    for flag in ["--model", "--port", "--host", "--dtype", "--max-num-speculative-tokens"]:
        assert flag in completed.stdout
    extra = ["--cpus", "--numa-node", "--threads", "--backend"] if module == "draft_server" else ["--draft", "--device"]
    for flag in extra:
        assert flag in completed.stdout


def test_sessions_are_spread_over_several_draft_servers(model_dirs, log_dir, reference, unrelated_draft,
                                                         related_draft):
    from servers import start_target

    target = start_target(model_dirs["target"], log_dir, "target-two-drafts",
                          [unrelated_draft.address, related_draft.address])
    try:
        with Client(target.address, timeout=60) as client:
            results = [client.generate(p, max_new_tokens=16, ignore_eos=True) for p in PROMPTS[:2]]
            info = client.info()
        assert {r.stats.draft_server for r in results} == {unrelated_draft.address, related_draft.address}
        for prompt, result in zip(PROMPTS, results):
            assert list(result.token_ids) == reference(prompt, 16)
        assert [s.connected for s in info.draft_servers] == [True, True]
    finally:
        assert target.stop() == 0


def test_async_client_generates_and_streams(target_related, reference):
    import asyncio

    from splitspec_client import AsyncClient

    async def run():
        async with AsyncClient(target_related.address, timeout=60) as client:
            result = await client.generate(PROMPTS[1], max_new_tokens=20, ignore_eos=True)
            chunks = [chunk async for chunk in client.stream(PROMPTS[1], max_new_tokens=20, ignore_eos=True)]
        return result, chunks

    result, chunks = asyncio.run(run())
    assert list(result.token_ids) == reference(PROMPTS[1], 20)
    assert [t for c in chunks for t in c.token_ids] == list(result.token_ids)


def test_draft_info_reports_pinning_and_isa(model_dirs, log_dir):
    import grpc
    from splitspec_client.v1 import draft_pb2, draft_pb2_grpc

    from servers import start_draft

    draft = start_draft(model_dirs["related_draft"], log_dir, "pinned-draft", "--cpus", "0", "--numa-node", "0")
    try:
        with grpc.insecure_channel(draft.address) as channel:
            info = draft_pb2_grpc.DraftServiceStub(channel).Info(draft_pb2.DraftInfoRequest(), timeout=10)
    finally:
        assert draft.stop() == 0
    assert list(info.pinned_cpus) == [0] and info.threads == 1
    assert info.dtype == "float32" and info.backend == "torch"
    assert info.isa != draft_pb2.ISA_UNSPECIFIED and "avx2" in info.isa_flags
    # Binding to node 0 works on this single-node machine unless the sandbox forbids set_mempolicy; then it says so.
    assert info.numa_node == 0 or any("memory binding" in note for note in info.pinning_notes)
    assert info.vocabulary.vocab_size > 0 and info.max_context_tokens == 512 and info.live_sessions == 0


def test_draft_refuses_impossible_pinning(model_dirs):
    import subprocess
    import sys

    completed = subprocess.run([sys.executable, "-m", "draft_server", "--model", model_dirs["related_draft"],
                                "--numa-node", "7"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2
    assert "--numa-node 7: no such NUMA node" in completed.stderr


def test_stream_chunks_say_where_each_round_spent_its_time(target_related, reference):
    with Client(target_related.address, timeout=60) as client:
        chunks = list(client.stream(PROMPTS[1], max_new_tokens=48, num_speculative_tokens=3, ignore_eos=True))
    assert [t for c in chunks for t in c.token_ids] == reference(PROMPTS[1], 48)
    timings = [chunk.round_timing for chunk in chunks]
    stats = chunks[-1].stats
    assert all(timing is not None for timing in timings) and len(timings) == stats.rounds
    assert sum(t.draft_wait_ns for t in timings) == stats.draft_wait_ns
    assert sum(t.verify_ns for t in timings) <= stats.verify_ns  # the stats also count the prefill
    assert sum(t.drafted_ahead for t in timings) == stats.num_drafts_ahead
    # Each round's block size: the draft tokens it verified, of which the chunk's tokens but the last were accepted.
    assert sum(t.num_draft_tokens for t in timings) == stats.num_draft_tokens
    assert sum(len(c.token_ids) - 1 for c in chunks) == stats.num_accepted_tokens
    assert all(0 < t.num_draft_tokens <= 3 for t in timings)
    for timing in timings:
        assert timing.round_ns >= timing.draft_wait_ns + timing.verify_ns > 0
        assert timing.block_draft_ns > 0 and timing.batch_size == 1
    # A block drafted after the previous verdict is waited for whole: the round holds its drafting. The first
    # block was drafted while the target prefilled: the round holds only its wait for it.
    assert all(t.overhead_ns >= 0 for t in timings)
    # The target's own part: a round is its wait for the block, its forward, and the target's own work in between.
    assert all(0 < t.target_overhead_ns < t.round_ns - t.verify_ns for t in timings[1:])


@pytest.mark.parametrize("target", ["target_related", "target_alone"])
def test_rounds_that_ask_no_draft_report_no_draft_wait(request, target, reference):
    # target.proto: RoundTiming.draft_wait_ns is 0 in a round without a block, and GenerationStats.draft_wait_ns
    # sums it: speculation off for the request, or no draft server at all, waits for none.
    with Client(request.getfixturevalue(target).address, timeout=60) as client:
        chunks = list(client.stream(PROMPTS[0], max_new_tokens=8, num_speculative_tokens=0, ignore_eos=True))
    assert [t for c in chunks for t in c.token_ids] == reference(PROMPTS[0], 8)
    assert [c.round_timing.draft_wait_ns for c in chunks] == [0] * len(chunks)
    assert chunks[-1].stats.num_drafts == 0 and chunks[-1].stats.draft_wait_ns == 0

"""The synthesize stage: real generation with the embedded SmolLM2, the Ollama backend against a protocol double,
resuming and extending runs without loss or duplicates, and deterministic prompts in several languages."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline_config.synthesize import QualityConfig, SynthesizeConfig
from tasks.synthesis.backend import StoryRequest
from tasks.synthesis.llamacpp import MIN_SHARED_PREFIX, LlamaCppBackend, common_prefix
from tasks.synthesis.sampling import sample_token, sample_tokens, top_superset
from tasks.synthesis.quality import detect_language, words
from tasks.synthesis.recipes import load_recipe, story_prompt
from tasks.synthesize import REJECTED, STORIES, SynthesizeError, synthesize
from tests.loopback import closed_port
from tests.ollama_double import OllamaDouble

# Gates that pass anything non-empty: these tests are about the plumbing, test_story_quality.py about the gates.
LENIENT = QualityConfig(
    min_words=1,
    require_final_punctuation=False,
    trim_unfinished=False,
    max_repeated_ngram_fraction=1.0,
    max_word_run=1000,
    check_language=False,
    min_required_words=0,
    near_duplicate_jaccard=1.0,
)


def ollama_cfg(host: str, **overrides) -> SynthesizeConfig:
    fields = dict(backend="ollama", host=host, n=3, parallel=2, max_tokens=64, timeout_s=5, retries=0,
                  retry_backoff_s=0.01, quality=QualityConfig(min_words=10, min_required_words=3))
    return SynthesizeConfig(**{**fields, **overrides})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- embedded llama.cpp -------------------------------------------------------------------------------------------


MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf@f32"  # the packaged GGUF, its weights converted to f32 at load


def test_llamacpp_writes_stories_with_the_packaged_model(tmp_path):
    cfg = SynthesizeConfig(n=2, max_tokens=32, parallel=2, quality=LENIENT, seed=7)
    summary = synthesize(cfg, tmp_path)
    stories = read_jsonl(tmp_path / STORIES)
    assert summary["n_accepted"] == len(stories) == 2
    assert sorted(s["index"] for s in stories) == [0, 1]
    for story in stories:
        assert story["text"].strip() and story["backend"] == "llamacpp" and story["model"] == MODEL
        assert story["language"] == "en" and set(story["words"]) == {"verb", "noun", "adjective"}
        assert 0 < story["tokens"] <= 32 and story["prompt"].startswith("Write a story for a ")
    assert summary["model"] == MODEL and summary["tokens_generated"] > 0 and summary["tokens_per_s"] > 0
    assert summary["files"][STORIES]["records"] == 2 and summary["stories_path"] == str(tmp_path / STORIES)
    assert json.loads((tmp_path / "synthesis.json").read_text())["recipe"]["name"] == "tinystories"


def recipe_requests(indices) -> list[StoryRequest]:
    recipe = load_recipe("tinystories")
    requests = []
    for index in indices:
        p = story_prompt(recipe, 0, index, ["en"])
        requests.append(StoryRequest(index=index, attempt=0, prompt=p.prompt, system=p.system, seed=1))
    return requests


def one_story(backend: LlamaCppBackend, request: StoryRequest) -> str:
    queue = [request]
    return [c.text for c in backend.generate(lambda: queue.pop() if queue else None)][0]


def empty_prefix_cache(backend: LlamaCppBackend, slots: int) -> None:
    """Forget every cached prefix and recent prompt; let the cache use `slots` of the context's prefix sequences."""
    for p in backend._prefixes:
        backend._lib.llama_memory_seq_rm(backend._memory, p.seq_id, -1, -1)
    backend._prefixes.clear()
    backend._recent.clear()
    backend.n_prefixes = slots
    backend.prefixes_made = backend.prefix_tokens_reused = 0


def test_cached_prompt_prefix_gives_the_same_story_as_the_whole_prompt():
    backend = LlamaCppBackend(SynthesizeConfig(n=1, parallel=1, max_tokens=12, temperature=0.0))
    first, second = recipe_requests([0, 1])
    try:
        whole = one_story(backend, first)  # nothing cached yet: the whole prompt is processed
        one_story(backend, second)  # a second prompt shows which prefix the two share, and caches it
        assert backend.prefix_tokens_reused > 10
        reused = backend.prefix_tokens_reused
        assert one_story(backend, first) == whole  # greedy decoding on copied KV cells: the same tokens
        assert backend.prefix_tokens_reused > reused
    finally:
        backend.close()


@pytest.fixture(scope="module")
def greedy_backends():
    """A backend that caches prompt prefixes and one that processes every prompt whole (the reference). Settings fixed,
    not this machine's pick: without flash attention a prompt processed in two pieces gives the same logits to the bit
    as processed whole; llama.cpp's flash attention takes another kernel for fewer query rows (last bits differ)."""
    cfg = SynthesizeConfig(n=1, parallel=1, max_tokens=12, temperature=0.0, requantize="f32", flash_attn=False,
                           cache_type_k="f16")
    plain, cached = LlamaCppBackend(cfg), LlamaCppBackend(cfg)
    plain._share_prefix = lambda seq_id, tokens: 0
    yield plain, cached
    plain.close()
    cached.close()


def test_prompts_that_agree_further_get_a_longer_cached_prefix_and_the_same_stories(greedy_backends):
    """Prompts 0 and 1 are for 4-year-olds, 2 and 3 for 3-year-olds. The first pair caches a prefix through the age
    and on to the verb; prompt 2 takes only the part before the age from it (a copy of the whole stream, the rest
    removed); prompt 3 makes a second prefix, extending the first one's shared part. Greedy stories are those of a
    backend that caches nothing."""
    plain, cached = greedy_backends
    empty_prefix_cache(cached, 4)
    requests = recipe_requests(range(4))
    reused = []
    for request in requests:
        assert one_story(cached, request) == one_story(plain, request)
        reused.append(cached.prefix_tokens_reused - sum(reused))
    tokens = [cached.chat_tokens(r.system, r.prompt) for r in requests]
    assert reused[0] == 0 and cached.prefixes_made == 2
    assert reused[1] == common_prefix(tokens[0], tokens[1]) > reused[2] == common_prefix(tokens[1], tokens[2])
    assert reused[3] == common_prefix(tokens[2], tokens[3]) >= reused[2] + MIN_SHARED_PREFIX
    assert sorted(len(p.tokens) for p in cached._prefixes) == [reused[1], reused[3]]


@pytest.mark.parametrize("slots,made,ages", [(1, 4, ["4"]), (2, 3, ["4", "5"])])
def test_a_full_prefix_cache_evicts_the_least_recently_used_and_stories_stay_the_same(greedy_backends, slots, made,
                                                                                      ages):
    """Prompts in pairs for ages 4, 3 and 5, then 4 again, with room for one or two prefixes. One slot: each age's
    prefix evicts the one it extends (extended in place), the last is age 4's. Two slots: age 5's evicts age 3's (the
    least recently used, not the one it extends), and the last pair finds age 4's still there. Every story is still the
    reference's."""
    plain, cached = greedy_backends
    empty_prefix_cache(cached, slots)  # the context has 4 prefix sequences; the cache may use only these
    for request in recipe_requests([0, 1, 2, 3, 4, 6, 5, 7]):
        assert one_story(cached, request) == one_story(plain, request)
        assert len(cached._prefixes) <= slots
    texts = [cached.llm.detokenize(p.tokens).decode() for p in cached._prefixes]
    assert cached.prefixes_made == made
    assert sorted(re.search(r"(\d)-year-old", text).group(1) for text in texts) == ages


def test_a_story_moved_to_a_lower_slot_continues_unchanged():
    """Busy slots are kept contiguous (llama.cpp runs one ubatch per run of consecutive sequence ids): a story moved
    into a free slot carries its KV cells along, so greedy decoding writes the same text as without the move."""
    backend = LlamaCppBackend(SynthesizeConfig(n=2, parallel=3, max_tokens=16, temperature=0.0))
    requests = recipe_requests([3, 4])

    def run(answers: list) -> dict[int, str]:
        return {c.request.index: c.text for c in backend.generate(lambda: answers.pop(0) if answers else None)}

    try:
        in_place = run(list(requests))  # slots 0 and 1: nothing to move
        assert backend.slot_moves == 0
        # slot 0 gets nothing, slots 1 and 2 get the stories: the one in slot 2 is moved down to slot 0
        moved = run([None, *requests])
        assert backend.slot_moves == 1
        assert moved == in_place and all(text.strip() for text in moved.values())
    finally:
        backend.close()


def test_sampling_is_deterministic_per_seed_and_respects_top_k():
    logits = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    kwargs = dict(temperature=0.8, top_k=5, top_p=0.95, repeat_penalty=1.3)
    before = logits.copy()
    draws = [sample_token(logits, [1, 2], np.random.default_rng(42), **kwargs) for _ in range(2)]
    assert draws[0] == draws[1] and np.array_equal(logits, before)  # the penalty went to a copy
    top5 = set(np.argsort(-logits)[:5].tolist())
    rng = np.random.default_rng(1)
    assert {sample_token(logits, [], rng, **kwargs) for _ in range(200)} <= top5
    assert sample_token(logits, [], rng, temperature=0.0, top_k=0, top_p=1.0, repeat_penalty=1.0) == int(
        np.argmax(logits)
    )
    # the repeat penalty pushes a recently used best token below the runner-up
    best = int(np.argmax(logits))
    assert sample_token(logits, [best], rng, temperature=0.0, top_k=0, top_p=1.0, repeat_penalty=100.0) != best


def reference_sample(logits, recent, rng, *, temperature, top_k, top_p, repeat_penalty) -> int:
    """The sampler written plainly over the whole vocabulary (penalty, temperature, top-k, top-p, one draw)."""
    logits = logits.astype(np.float64)
    if recent:
        seen = np.unique(recent)
        logits[seen] = np.where(logits[seen] > 0, logits[seen] / repeat_penalty, logits[seen] * repeat_penalty)
    if temperature <= 0.0:
        return int(np.argmax(logits))
    order = np.argsort(-logits, kind="stable")[: top_k or None]
    probs = np.exp((logits[order] - logits[order[0]]) / temperature)
    cumulative = np.cumsum(probs / probs.sum())
    keep = min(int(np.searchsorted(cumulative, top_p)) + 1, len(order))
    cumulative = cumulative[:keep] / cumulative[keep - 1]
    return int(order[min(int(np.searchsorted(cumulative, rng.random(), side="right")), keep - 1)])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sampling_from_a_pool_of_candidates_matches_sampling_from_the_whole_vocabulary(temperature):
    """sample_token ranks only the candidates that can make the top k after the repeat penalty (top_superset)."""
    rng = np.random.default_rng(3)
    for trial in range(40):
        logits = (rng.normal(size=49_152) * 3).astype(np.float32)
        recent = rng.integers(0, 49_152, 64).tolist() + np.argsort(-logits)[: trial % 6].tolist()  # some of the best
        kwargs = dict(temperature=temperature, top_k=[50, 5, 0][trial % 3], top_p=0.95, repeat_penalty=1.3)
        assert sample_token(logits, recent, np.random.default_rng(trial), **kwargs) == reference_sample(
            logits, recent, np.random.default_rng(trial), **kwargs
        )
    values = rng.normal(size=1001)  # not a multiple of the group count: the tail is always a candidate
    assert set(np.argsort(-values)[:20].tolist()) <= set(top_superset(values, 20).tolist())


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.8, top_k=50, top_p=0.95, repeat_penalty=1.3),  # the stage's kind of settings
    dict(temperature=1.2, top_k=5, top_p=0.5, repeat_penalty=1.0),  # no penalty: no seen tokens at all
    dict(temperature=0.0, top_k=0, top_p=1.0, repeat_penalty=1.1),  # greedy: one row at a time
])
def test_sampling_every_row_at_once_draws_what_one_row_at_a_time_draws(kwargs):
    """sample_tokens (a step's stories together) against sample_token per story, same generators: rows that saw
    different numbers of tokens (padding), none, and token 0 (the padding value)."""
    rng = np.random.default_rng(5)
    for trial in range(12):
        logits = (rng.normal(size=(9, 49_152)) * 3).astype(np.float32)
        recents = [rng.integers(0, 49_152, int(rng.integers(0, 64))).tolist() + np.argsort(-logits[r])[: r % 4].tolist()
                   + ([0] if r % 3 == 0 else []) for r in range(9)]
        recents[4] = []
        one_by_one = [sample_token(logits[r], recents[r], np.random.default_rng(trial * 10 + r), **kwargs)
                      for r in range(9)]
        together = sample_tokens(logits, recents, [np.random.default_rng(trial * 10 + r) for r in range(9)], **kwargs)
        assert together == one_by_one


# --- Ollama, against the protocol double --------------------------------------------------------------------------


def test_ollama_backend_writes_stories_and_sends_options(tmp_path):
    with OllamaDouble() as server:
        summary = synthesize(ollama_cfg(server.host, n=4), tmp_path)
        sent = server.generation_requests()
    stories = read_jsonl(tmp_path / STORIES)
    assert summary["n_accepted"] == 4 and summary["backend"] == "ollama" and summary["model"] == "smollm2:135m"
    assert sorted(s["index"] for s in stories) == [0, 1, 2, 3]
    assert summary["tokens_generated"] == sum(s["tokens"] for s in stories) > 0
    assert all(r["path"] == "/api/chat" and r["stream"] is False for r in sent)
    assert {r["options"]["seed"] for r in sent} == {s["seed"] for s in stories}
    assert all(r["options"]["num_predict"] == 64 and r["options"]["temperature"] == 0.8 for r in sent)
    assert all(r["messages"][0]["role"] == "system" and r["messages"][1]["role"] == "user" for r in sent)


def test_ollama_model_missing_names_the_pull(tmp_path):
    with OllamaDouble(models=("llama3.2",)) as server:
        with pytest.raises(SynthesizeError, match=r"ollama pull smollm2:135m"):
            synthesize(ollama_cfg(server.host), tmp_path)


def test_ollama_unreachable_names_the_host(tmp_path):
    host = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(SynthesizeError, match="OLLAMA_HOST") as err:
        synthesize(ollama_cfg(host, retries=1), tmp_path)
    assert host in str(err.value) and "synthesize.host" in str(err.value)


def test_ollama_slow_reply_names_the_timeout(tmp_path):
    with OllamaDouble(delay_s=1.5) as server:
        with pytest.raises(SynthesizeError, match=r"synthesize\.timeout_s"):
            synthesize(ollama_cfg(server.host, n=1, timeout_s=0.3), tmp_path)


def test_ollama_server_error_is_retried(tmp_path):
    with OllamaDouble(failures=[500, 503]) as server:
        summary = synthesize(ollama_cfg(server.host, n=1, parallel=1, retries=2), tmp_path)
        assert len(server.generation_requests()) == 3
    assert summary["n_accepted"] == 1
    with OllamaDouble(failures=[500]) as server:
        with pytest.raises(SynthesizeError, match="HTTP 500"):
            synthesize(ollama_cfg(server.host, n=1, parallel=1, retries=0), tmp_path / "no-retry")


def test_the_double_speaks_streaming_and_listing():
    import ollama

    with OllamaDouble() as server:
        client = ollama.Client(host=server.host, timeout=5)
        assert [m.model for m in client.list().models] == ["smollm2:135m"]
        messages = [{"role": "user", "content": 'Use the verb "run".'}]
        chunks = list(client.chat(model="smollm2:135m", messages=messages, stream=True, options={"seed": 3}))
        whole = client.chat(model="smollm2:135m", messages=messages, options={"seed": 3})
        assert "".join(c.message.content for c in chunks) == whole.message.content
        assert chunks[-1].done and chunks[-1].eval_count == whole.eval_count
        generated = "".join(p.response for p in client.generate(model="smollm2:135m", prompt="x", stream=True))
        assert generated == client.generate(model="smollm2:135m", prompt="x").response


# --- resuming, extending, bounded retries -------------------------------------------------------------------------


def test_interrupted_run_resumes_without_loss_or_duplicates(tmp_path):
    cfg = ollama_cfg("", n=6, parallel=1)
    with OllamaDouble(fail_after=2) as server:
        with pytest.raises(SynthesizeError):
            synthesize(cfg.model_copy(update={"host": server.host}), tmp_path)
    before = (tmp_path / STORIES).read_bytes()
    assert len(read_jsonl(tmp_path / STORIES)) == 2
    with OllamaDouble() as server:
        summary = synthesize(cfg.model_copy(update={"host": server.host}), tmp_path)
        assert len(server.generation_requests()) == 4  # only the missing stories
    assert (tmp_path / STORIES).read_bytes().startswith(before)
    indices = [s["index"] for s in read_jsonl(tmp_path / STORIES)]
    assert sorted(indices) == list(range(6)) and summary["n_accepted"] == 6


def test_torn_last_line_is_cut_off_and_the_set_extends(tmp_path):
    with OllamaDouble() as server:
        synthesize(ollama_cfg(server.host, n=2), tmp_path)
        first = read_jsonl(tmp_path / STORIES)
        with open(tmp_path / STORIES, "ab") as handle:  # what a kill in the middle of a write leaves
            handle.write(b'{"index": 2, "text": "Once upon a ti')
        summary = synthesize(ollama_cfg(server.host, n=4), tmp_path)
        assert len(server.generation_requests()) == 4
    stories = read_jsonl(tmp_path / STORIES)  # every line parses again
    assert stories[:2] == first and sorted(s["index"] for s in stories) == [0, 1, 2, 3]
    assert summary["n_requested"] == 4 and summary["n_accepted"] == 4
    # a smaller n later deletes nothing (and needs no server): it counts the slots below n
    fewer = synthesize(ollama_cfg("http://127.0.0.1:9", n=2), tmp_path)
    assert fewer["n_accepted"] == 2 and fewer["stories_on_disk"] == 4
    # a last record complete but for its newline is kept; a corrupt line before the last is refused, not guessed at
    data = (tmp_path / STORIES).read_bytes()
    (tmp_path / STORIES).write_bytes(data.rstrip(b"\n"))
    with OllamaDouble() as server:
        assert synthesize(ollama_cfg(server.host, n=4), tmp_path)["n_accepted"] == 4
    assert (tmp_path / STORIES).read_bytes() == data
    (tmp_path / STORIES).write_bytes(b"{not json\n" + data)
    with pytest.raises(SynthesizeError, match="line 1 is corrupt"):
        synthesize(ollama_cfg("http://127.0.0.1:9", n=4), tmp_path)


def test_rejected_slots_are_bounded_and_not_retried_forever(tmp_path):
    loop = lambda request: "Lily said special " + "special " * 60 + "special."  # noqa: E731
    cfg = ollama_cfg("", n=2, max_attempts=3, quality=QualityConfig(min_words=5))
    with OllamaDouble(reply=loop) as server:
        summary = synthesize(cfg.model_copy(update={"host": server.host}), tmp_path)
        assert len(server.generation_requests()) == 6
        again = synthesize(cfg.model_copy(update={"host": server.host}), tmp_path)
        assert len(server.generation_requests()) == 6  # the second run has nothing left to try
    rejected = read_jsonl(tmp_path / REJECTED)
    assert {(r["index"], r["attempt"]) for r in rejected} == {(i, k) for i in range(2) for k in range(3)}
    assert len({r["seed"] for r in rejected}) == 6  # each attempt samples with its own seed
    assert summary["rejected"] == again["rejected"] == {"repetitive": 6}
    assert summary["n_accepted"] == 0 and summary["n_given_up"] == 2
    assert (tmp_path / STORIES).read_text() == ""


def test_changed_settings_are_refused_in_the_same_directory(tmp_path):
    with OllamaDouble() as server:
        synthesize(ollama_cfg(server.host, n=1), tmp_path)
        with pytest.raises(SynthesizeError, match="seed"):
            synthesize(ollama_cfg(server.host, n=1, seed=1), tmp_path)
        # execution knobs are not part of what a story is: changing them resumes fine
        synthesize(ollama_cfg(server.host, n=2, parallel=1, timeout_s=9), tmp_path)
    assert len(read_jsonl(tmp_path / STORIES)) == 2


def test_zero_stories_returns_at_once(tmp_path):
    cfg = SynthesizeConfig(n=0, backend="ollama", host=f"http://127.0.0.1:{closed_port()}")
    summary = synthesize(cfg, tmp_path / "out")
    assert summary["n_accepted"] == 0 and summary["n_requested"] == 0 and summary["tokens_generated"] == 0
    assert (tmp_path / "out" / STORIES).read_text() == ""


# --- recipes and config -------------------------------------------------------------------------------------------


def test_prompts_are_deterministic_per_recipe_seed_and_index():
    recipe = load_recipe("tinystories")
    a = story_prompt(recipe, 0, 5, ["en"])
    assert a == story_prompt(load_recipe("tinystories"), 0, 5, ["en"])
    assert a.prompt != story_prompt(recipe, 0, 6, ["en"]).prompt
    assert a.prompt != story_prompt(recipe, 1, 5, ["en"]).prompt
    assert all(word in a.prompt for word in a.words.values())
    prompts = {story_prompt(recipe, 0, i, ["en"]).prompt for i in range(50)}
    assert len(prompts) == 50
    features = {f for i in range(50) for f in story_prompt(recipe, 0, i, ["en"]).features}
    assert features == {"dialogue", "plot_twist", "bad_ending", "moral_value", "foreshadowing", "conflict"}


@pytest.mark.parametrize("language", ["en", "es", "fr"])
def test_each_language_prompts_in_its_language(language):
    recipe = load_recipe("tinystories")
    block = recipe.recipe.languages[language]
    minimum = 200 if language == "en" else 150
    assert min(len(block.verbs), len(block.nouns), len(block.adjectives)) >= minimum
    for i in range(5):
        p = story_prompt(recipe, 3, i, [language])
        assert p.language == language and detect_language(words(p.prompt))[0] == language
        assert p.words["verb"] in block.verbs and p.words["noun"] in block.nouns
    mixed = {story_prompt(recipe, 3, i, ["en", "es", "fr"]).language for i in range(30)}
    assert mixed == {"en", "es", "fr"}


def test_config_rejects_unknown_keys_and_bad_recipes(tmp_path):
    with pytest.raises(ValidationError):
        SynthesizeConfig.model_validate({"n": 1, "temprature": 0.5})
    with pytest.raises(ValidationError):
        SynthesizeConfig.model_validate({"quality": {"min_word": 3}})
    with pytest.raises(SynthesizeError, match="tinystories"):
        synthesize(SynthesizeConfig(n=1, recipe="no-such-recipe"), tmp_path / "a")
    with pytest.raises(SynthesizeError, match="no language"):
        synthesize(SynthesizeConfig(n=1, languages=["de"]), tmp_path / "b")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nreader_ages: [3]\nlanguages:\n  en: {template: '{colour}', verbs: [a], nouns: [b], "
                   "adjectives: [c]}\n")
    with pytest.raises(SynthesizeError, match="unknown template fields"):
        load_recipe(str(bad))


def test_parallel_defaults_to_each_backends_own():
    """llama.cpp measures its batch width on this machine (auto); an Ollama server gets 4 requests at a time."""
    assert SynthesizeConfig().parallel == "auto" and SynthesizeConfig(backend="ollama").parallel == 4
    assert SynthesizeConfig(backend="ollama", parallel=8).parallel == 8
    assert SynthesizeConfig.model_validate({"backend": "ollama"}).model_dump()["parallel"] == 4

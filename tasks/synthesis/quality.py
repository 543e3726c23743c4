"""Quality gates for synthetic stories: decide, with a named reason, whether a generated text joins the corpus.

A 135M-parameter model degenerates in recognisable ways: it loops ("special special special ..."), stops mid-sentence
when the token budget runs out, drifts into English when asked for Spanish, forgets the words it was asked to use, and
tells the same "Once upon a time, Lily ..." story twice. Each failure has one cheap check here, run in a fixed order
(cheapest and most common first) so every rejection is counted under exactly one reason.

The non-obvious decisions:
- Inflection is handled by prefix match on a stem (the word minus up to two final letters, never shorter than three
  letters): "jump" matches "jumped", "happy" matches "happily", "saltar" matches "saltó". Irregular forms ("run" →
  "ran") are missed; that is why `min_required_words` can be lowered.
- Language is a stopword profile, not a model: a children's story is about 40% function words, so the share of each
  language's stopwords identifies en/es/fr reliably beyond a couple of sentences, with no dependency.
- Near duplicates are found exactly (word-shingle Jaccard) through an inverted index over shingles, so a new story is
  compared only with stories that share at least one shingle. That is quadratic only in the worst case, which is
  fine at the tens of thousands of stories this CPU can generate; a MinHash index would be the next step beyond.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping

from pipeline_config.synthesize import QualityConfig

_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
_SENTENCE_END = ".!?…"
_CLOSERS = "\"'”’»)]*"  # may follow the final punctuation: «... dit-il.» / "Yes!"

# Function words of children's prose in each language, used only to tell the languages apart.
STOPWORDS: dict[str, frozenset[str]] = {
    "en": frozenset(
        "the and a an to was were is are he she it they his her their them him of in on at with for from but "
        "so very had has have said not that this there then when what you i we my me be one day all up out "
        "would could did do".split()
    ),
    "es": frozenset(
        "el la los las y de del que en un una unos se no su sus con por para es era eran muy pero al le les lo "
        "como más dijo estaba estaban fue mi tu yo él ella ellos día cuando también tenía había hay este esta "
        "todo todos".split()
    ),
    "fr": frozenset(
        "le la les et de des du un une il elle ils elles est était étaient que qui dans en pour pas ne sur au "
        "aux avec son sa ses très mais je tu nous vous dit on se ce cette plus jour aussi lui leur avait "
        "tout tous".split()
    ),
}


def words(text: str) -> list[str]:
    """Lower-cased words (letters with inner apostrophes); digits and punctuation are not words."""
    return [w.lower() for w in _WORD.findall(text)]


# --- the individual gates: each returns None (pass) or a short detail string (fail) -------------------------------


def check_length(tokens: list[str], min_words: int, max_words: int) -> str | None:
    if len(tokens) < min_words:
        return "too_short"
    if len(tokens) > max_words:
        return "too_long"
    return None


def is_finished(text: str) -> bool:
    """Ends with sentence punctuation, possibly followed by a closing quote or bracket."""
    tail = text.rstrip().rstrip(_CLOSERS).rstrip()
    return bool(tail) and tail[-1] in _SENTENCE_END


def trim_to_last_sentence(text: str) -> str:
    """Cut an unfinished text back to its last complete sentence ('' if there is none)."""
    text = text.rstrip()
    for cut in range(len(text) - 1, -1, -1):
        if text[cut] in _SENTENCE_END:
            end = cut + 1
            while end < len(text) and text[end] in _CLOSERS:
                end += 1
            return text[:end]
    return ""


def repeated_ngram_fraction(tokens: list[str], n: int) -> float:
    """Share of word n-grams that repeat an earlier one: 0 for varied prose, near 1 for a loop."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def longest_word_run(tokens: list[str]) -> int:
    """Length of the longest run of one word repeated back to back ("very very very" → 3)."""
    best = run = 0
    previous = None
    for token in tokens:
        run = run + 1 if token == previous else 1
        best = max(best, run)
        previous = token
    return best


def check_repetition(tokens: list[str], n: int, max_fraction: float, max_run: int) -> str | None:
    if longest_word_run(tokens) > max_run:
        return "repetitive"
    if repeated_ngram_fraction(tokens, n) > max_fraction:
        return "repetitive"
    return None


def stem(word: str) -> str:
    word = word.lower()
    return word if len(word) <= 4 else word[: max(3, len(word) - 2)]


def required_words_found(tokens: Iterable[str], required: Iterable[str]) -> list[str]:
    """The required words that occur in `tokens`, allowing simple inflection (prefix match on a stem)."""
    vocabulary = set(tokens)
    found = []
    for word in required:
        parts = [stem(part) for part in words(word)]
        # a multi-word term ("ice cream") counts when each of its parts occurs
        if parts and all(any(token.startswith(part) for token in vocabulary) for part in parts):
            found.append(word)
    return found


def detect_language(tokens: list[str]) -> tuple[str | None, float]:
    """The language whose stopwords cover the most tokens, and that coverage (0..1)."""
    if not tokens:
        return None, 0.0
    scores = {lang: sum(t in stop for t in tokens) / len(tokens) for lang, stop in STOPWORDS.items()}
    best = max(scores, key=scores.__getitem__)
    return best, scores[best]


def check_language(tokens: list[str], expected: str, min_coverage: float) -> str | None:
    if expected not in STOPWORDS:
        return None  # a language without a profile cannot be checked; the recipe still names it
    detected, coverage = detect_language(tokens)
    if detected != expected or coverage < min_coverage:
        return "wrong_language"
    return None


def fingerprint(tokens: list[str]) -> str:
    """Identity of a text up to case, punctuation and spacing: the exact-duplicate key."""
    return hashlib.sha256(" ".join(tokens).encode("utf-8")).hexdigest()


def shingles(tokens: list[str], k: int) -> set[int]:
    """Word k-shingles, hashed to 64-bit ints (stable across processes, unlike hash())."""
    if len(tokens) < k:
        grams = [" ".join(tokens)] if tokens else []
    else:
        grams = [" ".join(tokens[i : i + k]) for i in range(len(tokens) - k + 1)]
    return {int.from_bytes(hashlib.blake2b(g.encode("utf-8"), digest_size=8).digest(), "little") for g in grams}


class NearDuplicateIndex:
    """Exact Jaccard similarity of word shingles against every story added so far, via an inverted index."""

    def __init__(self, k: int):
        self.k = k
        self._postings: dict[int, list[int]] = {}
        self._sizes: list[int] = []

    def __len__(self) -> int:
        return len(self._sizes)

    def most_similar(self, tokens: list[str]) -> float:
        grams = shingles(tokens, self.k)
        if not grams:
            return 0.0
        shared: Counter[int] = Counter()
        for gram in grams:
            shared.update(self._postings.get(gram, ()))
        best = 0.0
        for doc, common in shared.items():
            best = max(best, common / (len(grams) + self._sizes[doc] - common))
        return best

    def add(self, tokens: list[str]) -> None:
        doc = len(self._sizes)
        grams = shingles(tokens, self.k)
        self._sizes.append(len(grams))
        for gram in grams:
            self._postings.setdefault(gram, []).append(doc)


@dataclass(frozen=True)
class Verdict:
    reason: str | None  # None: accepted
    text: str  # the text as it would be stored (possibly trimmed to its last sentence)
    n_words: int

    @property
    def accepted(self) -> bool:
        return self.reason is None


REASONS = (
    "empty",
    "too_short",
    "too_long",
    "unfinished",
    "repetitive",
    "wrong_language",
    "missing_words",
    "duplicate",
    "near_duplicate",
)


class QualityGate:
    """Applies the gates in order; `admit` also remembers accepted stories for the duplicate checks."""

    def __init__(self, cfg: QualityConfig):
        self.cfg = cfg
        self._fingerprints: set[str] = set()
        self._near = NearDuplicateIndex(cfg.shingle_size)

    def judge(
        self,
        text: str,
        language: str,
        required: Mapping[str, str] | Iterable[str] = (),
        truncated: bool = False,
    ) -> Verdict:
        """Judge one generated text. `truncated`: generation stopped at the token budget rather than by itself."""
        cfg = self.cfg
        text = text.strip()
        if truncated and cfg.trim_unfinished:
            text = trim_to_last_sentence(text)
        tokens = words(text)
        reason = self._reason(text, tokens, language, required)
        return Verdict(reason=reason, text=text, n_words=len(tokens))

    def _reason(self, text: str, tokens: list[str], language: str, required) -> str | None:
        cfg = self.cfg
        if not tokens:
            return "empty"
        if failed := check_length(tokens, cfg.min_words, cfg.max_words):
            return failed
        if cfg.require_final_punctuation and not is_finished(text):
            return "unfinished"
        if failed := check_repetition(tokens, cfg.ngram_size, cfg.max_repeated_ngram_fraction, cfg.max_word_run):
            return failed
        if cfg.check_language and (failed := check_language(tokens, language, cfg.min_stopword_coverage)):
            return failed
        required = list(required.values()) if isinstance(required, Mapping) else list(required)
        needed = min(cfg.min_required_words, len(required))
        if needed and len(required_words_found(tokens, required)) < needed:
            return "missing_words"
        if fingerprint(tokens) in self._fingerprints:
            return "duplicate"
        if cfg.near_duplicate_jaccard < 1.0 and self._near.most_similar(tokens) >= cfg.near_duplicate_jaccard:
            return "near_duplicate"
        return None

    def admit(self, text: str) -> None:
        """Remember an accepted story (also used to reload the stories accepted in an earlier run)."""
        tokens = words(text)
        self._fingerprints.add(fingerprint(tokens))
        if self.cfg.near_duplicate_jaccard < 1.0:
            self._near.add(tokens)

"""Each quality gate accepts a good story and rejects a bad one under its own reason."""
from __future__ import annotations

import pytest

from pipeline_config.synthesize import QualityConfig
from tasks.synthesis.quality import (
    NearDuplicateIndex,
    QualityGate,
    detect_language,
    is_finished,
    repeated_ngram_fraction,
    required_words_found,
    trim_to_last_sentence,
    words,
)

GOOD_EN = (
    "Once upon a time, a little girl named Lily found a shiny red ball in the park. She wanted to jump with it. "
    "\"Can I play too?\" asked her friend Tom. Lily smiled and said yes. They jumped and laughed all day long. "
    "When the sun went down, they walked home together, happy and tired. Lily learned that sharing is fun."
)
GOOD_ES = (
    "Había una vez un perro pequeño que vivía en una casa azul. Un día, el perro encontró una pelota roja en el "
    "jardín. Estaba muy feliz y quería saltar con ella. Su amiga, la gata Luna, le dijo: \"¿Puedo jugar contigo?\" "
    "El perro dijo que sí, y los dos jugaron juntos hasta la noche. Fue un día muy bonito para todos."
)
GOOD_FR = (
    "Il était une fois un petit lapin qui vivait dans la forêt. Un jour, il a trouvé une pomme rouge sous un "
    "arbre. Il était très content et voulait la partager avec son amie la tortue. « Merci ! » dit la tortue. "
    "Ils ont mangé la pomme ensemble et ils ont ri toute la journée. Le soir, le lapin est rentré dans sa maison."
)
WORDS_EN = {"verb": "jump", "noun": "ball", "adjective": "shiny"}


def gate(**overrides) -> QualityGate:
    return QualityGate(QualityConfig(**{"min_words": 20, "max_words": 200, **overrides}))


def test_good_stories_pass_in_each_language():
    g = gate()
    assert g.judge(GOOD_EN, "en", WORDS_EN).accepted
    assert g.judge(GOOD_ES, "es", {"verb": "saltar", "noun": "pelota", "adjective": "rojo"}).accepted
    assert g.judge(GOOD_FR, "fr", {"verb": "partager", "noun": "pomme", "adjective": "rouge"}).accepted


def test_length_gate():
    assert gate().judge("The dog ran home. The end.", "en").reason == "too_short"
    long = " ".join([GOOD_EN] * 3)
    assert gate(max_words=100, max_repeated_ngram_fraction=1.0, near_duplicate_jaccard=1.0).judge(
        long, "en"
    ).reason == "too_long"
    assert gate().judge("   ", "en").reason == "empty"


def test_unfinished_gate_and_trim():
    cut = GOOD_EN + " Then Lily saw a big"
    assert not is_finished(cut) and is_finished(GOOD_EN) and is_finished('He said, "Goodbye!"')
    assert gate(trim_unfinished=False).judge(cut, "en", WORDS_EN, truncated=True).reason == "unfinished"
    # a story cut by the token budget is trimmed back to its last full sentence and then passes
    trimmed = gate().judge(cut, "en", WORDS_EN, truncated=True)
    assert trimmed.accepted and trimmed.text == GOOD_EN
    # a story that stopped by itself mid-sentence is not trimmed: it is unfinished
    assert gate().judge(cut, "en", WORDS_EN, truncated=False).reason == "unfinished"
    assert trim_to_last_sentence("no end here") == ""


def test_repetition_gate_catches_loops_and_word_runs():
    loop = GOOD_EN[:120] + " special" * 40 + "."
    assert repeated_ngram_fraction(words(loop), 3) > 0.5
    assert repeated_ngram_fraction(words(GOOD_EN), 3) < 0.05
    assert gate().judge(loop, "en").reason == "repetitive"
    run = GOOD_EN.replace("very", "").replace("happy", "very very very very happy")
    assert gate().judge(run, "en", WORDS_EN).reason == "repetitive"


def test_language_gate():
    assert detect_language(words(GOOD_EN))[0] == "en"
    assert detect_language(words(GOOD_ES))[0] == "es"
    assert detect_language(words(GOOD_FR))[0] == "fr"
    assert gate().judge(GOOD_EN, "es").reason == "wrong_language"
    assert gate().judge(GOOD_FR, "en").reason == "wrong_language"
    assert gate(check_language=False).judge(GOOD_EN, "es").accepted


def test_required_words_gate_allows_inflection():
    assert required_words_found(words("She jumped over the happily barking dogs."), ["jump", "happy", "dog"]) == [
        "jump",
        "happy",
        "dog",
    ]
    assert required_words_found(words("El perro saltó."), ["saltar", "perro"]) == ["saltar", "perro"]
    missing = {"verb": "decorate", "noun": "thunder", "adjective": "ancient"}
    assert gate(min_required_words=1).judge(GOOD_EN, "en", missing).reason == "missing_words"
    assert gate(min_required_words=3).judge(GOOD_EN, "en", WORDS_EN).accepted
    two_of_three = {"verb": "jump", "noun": "ball", "adjective": "ancient"}
    assert gate(min_required_words=3).judge(GOOD_EN, "en", two_of_three).reason == "missing_words"
    assert gate(min_required_words=2).judge(GOOD_EN, "en", two_of_three).accepted
    assert gate(min_required_words=0).judge(GOOD_EN, "en", missing).accepted


def test_exact_and_near_duplicates():
    g = gate()
    first = g.judge(GOOD_EN, "en", WORDS_EN)
    assert first.accepted
    g.admit(first.text)
    # the same story up to case and punctuation is an exact duplicate
    assert g.judge(GOOD_EN.upper().replace(",", ""), "en", WORDS_EN).reason == "duplicate"
    # one changed sentence: a near duplicate
    edited = GOOD_EN.replace("They jumped and laughed all day long.", "They jumped until the moon came out.")
    assert g.judge(edited, "en", WORDS_EN).reason == "near_duplicate"
    # a different story with the same words is not
    other = (
        "Tom had a shiny blue ball. Every morning he liked to jump with it in the yard. One day the ball rolled "
        "into the pond and a frog looked at it. The frog pushed the ball back with its nose. Tom thanked the frog "
        "and they became good friends. From then on, they played together every morning."
    )
    assert g.judge(other, "en", WORDS_EN).accepted


def test_near_duplicate_index_is_exact_jaccard():
    index = NearDuplicateIndex(k=2)
    index.add(words("a b c d"))  # shingles: ab bc cd
    assert index.most_similar(words("a b c d")) == 1.0
    assert index.most_similar(words("a b c e")) == pytest.approx(2 / 4)  # ab bc shared; union ab bc cd ce
    assert index.most_similar(words("x y z")) == 0.0

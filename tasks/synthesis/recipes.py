"""Story recipes: turn (recipe, seed, story index) into the prompt that asks a model for that story.

The method is TinyStories' (Eldan & Li, 2023): a prompt names one verb, one noun and one adjective drawn from a few
hundred simple words per part of speech, plus a random subset of narrative features (dialogue, plot twist, bad
ending, ...) and a reader age. Random combinations are what keep thousands of stories from one small model diverse.
Recipes are YAML data in `pipeline_config/recipes/` (one block of word lists, features and prompt template per
language), so a user adds a language or a recipe without code.

The non-obvious decision: each story draws from its own `random.Random` seeded by a BLAKE2 hash of
(recipe name, seed, index), never from one generator shared by the run and never through Python's salted `hash()`.
Story i's prompt therefore depends on nothing but those three values: it is the same whether the run is resumed,
extended or generated in a different order, which is what makes resuming and extending a run safe.
"""
from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.synthesis.backend import SynthesizeError

RECIPES_DIR = Path(__file__).resolve().parents[2] / "pipeline_config" / "recipes"
TEMPLATE_FIELDS = frozenset({"age", "verb", "noun", "adjective", "features"})


class LanguageRecipe(BaseModel):
    """One language of a recipe: its prompt template, feature sentences and word lists."""

    model_config = ConfigDict(extra="forbid")

    system: str | None = Field(None, description="system message sent before the prompt")
    template: str = Field(description="format string with {age} {verb} {noun} {adjective} {features}")
    features: dict[str, str] = Field(default_factory=dict, description="feature id -> sentence asking for it")
    verbs: list[str] = Field(min_length=1)
    nouns: list[str] = Field(min_length=1)
    adjectives: list[str] = Field(min_length=1)

    @field_validator("template")
    @classmethod
    def _known_fields(cls, template: str) -> str:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        unknown = names - TEMPLATE_FIELDS
        if unknown:
            raise ValueError(f"unknown template fields {sorted(unknown)}; allowed: {sorted(TEMPLATE_FIELDS)}")
        return template

    @field_validator("verbs", "nouns", "adjectives")
    @classmethod
    def _distinct_words(cls, words: list[str]) -> list[str]:
        # a word YAML reads as something else (no, on, 12) is caught by the str type; duplicates would skew draws
        seen: set[str] = set()
        twice = sorted({w for w in words if w in seen or seen.add(w)})
        if twice:
            raise ValueError(f"words listed twice: {twice}")
        return words


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str | None = None
    reader_ages: list[int] = Field(min_length=1)
    features_per_story: tuple[int, int] = Field((0, 2), description="inclusive range of features per prompt")
    languages: dict[str, LanguageRecipe] = Field(min_length=1)

    @model_validator(mode="after")
    def _feature_range(self) -> "Recipe":
        low, high = self.features_per_story
        if not 0 <= low <= high:
            raise ValueError(f"features_per_story must be [low, high] with 0 <= low <= high, got {[low, high]}")
        return self


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    path: Path
    sha256: str  # of the file's bytes: part of a run's identity, so an edited recipe is never mixed with the old

    @property
    def name(self) -> str:
        return self.recipe.name


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    """A recipe name resolves in pipeline_config/recipes/; anything with a suffix or a slash is a path."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml") or len(candidate.parts) > 1:
        path = candidate
    else:
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise SynthesizeError(
            f"recipe {name_or_path!r} not found (looked for {path}); set synthesize.recipe to one of "
            f"{available_recipes()} or to the path of a recipe YAML file"
        )
    return path


def load_recipe(name_or_path: str) -> LoadedRecipe:
    path = recipe_path(name_or_path)
    raw = path.read_bytes()
    try:
        recipe = Recipe.model_validate(yaml.safe_load(raw))
    except yaml.YAMLError as err:
        raise SynthesizeError(f"recipe {path} is not valid YAML: {err}") from err
    except ValidationError as err:
        raise SynthesizeError(f"recipe {path} is invalid:\n{err}") from err
    return LoadedRecipe(recipe=recipe, path=path, sha256=hashlib.sha256(raw).hexdigest())


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any tuple of values, stable across processes and platforms (BLAKE2b, not hash())."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


@dataclass(frozen=True)
class StoryPrompt:
    """Everything that determines what story i is asked to be; stored beside the story's text."""

    index: int
    language: str
    age: int
    words: dict[str, str]  # {"verb": ..., "noun": ..., "adjective": ...}
    features: list[str]
    system: str | None
    prompt: str
    recipe: str = field(default="")


def check_languages(loaded: LoadedRecipe, languages: Sequence[str]) -> None:
    missing = [lang for lang in languages if lang not in loaded.recipe.languages]
    if missing:
        raise SynthesizeError(
            f"recipe {loaded.path} has no language {missing}; it has {sorted(loaded.recipe.languages)}: "
            f"change synthesize.languages or add a block under `languages:` in the recipe"
        )


def story_prompt(loaded: LoadedRecipe, seed: int, index: int, languages: Sequence[str]) -> StoryPrompt:
    """The prompt of story `index`: a pure function of (recipe, seed, index) and the list of languages."""
    recipe = loaded.recipe
    rng = random.Random(derive_seed("story", recipe.name, seed, index))
    language = rng.choice(list(languages))
    block = recipe.languages[language]
    age = rng.choice(recipe.reader_ages)
    words = {
        "verb": rng.choice(block.verbs),
        "noun": rng.choice(block.nouns),
        "adjective": rng.choice(block.adjectives),
    }
    low, high = recipe.features_per_story
    names = sorted(block.features)
    features = sorted(rng.sample(names, min(len(names), rng.randint(low, high))))
    rendered = "".join(" " + block.features[name] for name in features)
    prompt = block.template.format(age=age, features=rendered, **words).strip()
    return StoryPrompt(
        index=index,
        language=language,
        age=age,
        words=words,
        features=features,
        system=block.system,
        prompt=prompt,
        recipe=recipe.name,
    )

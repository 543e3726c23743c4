"""The export stage's settings: which transformers and GGUF files are written, and the Ollama Modelfile."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline_config.section import Section


class ExportConfig(Section):
    """Hand the trained model to other runtimes: a transformers folder and GGUF files for llama.cpp and Ollama."""

    formats: list[Literal["hf", "gguf"]] = Field(default_factory=lambda: ["hf", "gguf"],
                                                 description="which exports to write; [] turns the stage into a no-op")
    gguf_outtype: Literal["f32", "f16"] = Field("f32", description="the unquantized GGUF the quantized ones come from")
    quantize: list[Literal["q8_0", "q5_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"]] = Field(
        default_factory=lambda: ["q8_0"], description="GGUF types made from it with llama.cpp's quantizer")
    modelfile: str | None = Field("q8_0", description="the GGUF type the Ollama Modelfile points at (None: no "
                                  "Modelfile)")
    temperature: float = Field(0.8, ge=0, description="the Modelfile's default sampling temperature")
    on_unsupported: Literal["skip", "error"] = Field(
        "skip", description="a model with no exact equivalent in a format (GGUF of a char-level vocabulary, say): "
        "record why and go on, or fail the stage")

    @model_validator(mode="after")
    def _modelfile_is_made(self) -> "ExportConfig":
        made = [self.gguf_outtype, *self.quantize]
        if self.modelfile is not None and self.modelfile not in made:
            raise ValueError(f"modelfile {self.modelfile!r} names a GGUF this stage does not write (it writes "
                             f"{', '.join(made)}): add it to export.quantize, or set modelfile to one of those or null")
        return self

"""Export a trained model to the formats other runtimes load: a transformers folder and GGUF (llama.cpp, Ollama).

    export_hf(model, tokenizer_dir, "out/hf")                   # AutoModelForCausalLM / AutoTokenizer, no custom code
    f32 = export_gguf(model, tokenizer_dir, "out/model-f32.gguf")
    quantize_gguf(f32, "out/model-q8_0.gguf", "q8_0")           # llama.cpp's own quantizer
    write_modelfile("out", "model-q8_0.gguf")                   # `ollama create NAME -f out/Modelfile`

Each architecture is exported as the stock architecture that computes the same function, never as custom code: llama
as Llama, gpt as GPT-2, mamba2 as Mamba-2. The tensors are first renamed and reshaped into the transformers layout
(`hf.hf_tensors`), and the GGUF writer starts from that same dictionary, applying exactly the per-tensor transforms of
llama.cpp's own `convert_hf_to_gguf.py`. Both exports therefore agree on one layout, and a GGUF written here is the
file llama.cpp's converter would write from our transformers folder.

What cannot be exported exactly raises `ExportError` instead of writing a file that computes something else.
"""


class ExportError(ValueError):
    """The model or tokenizer has no exact equivalent in the target format; the message says what and what to do."""


from .gguf import export_gguf, gguf_tensor_types, quantize_gguf, write_modelfile  # noqa: E402  (needs ExportError)
from .hf import export_hf  # noqa: E402

__all__ = ["ExportError", "export_hf", "export_gguf", "quantize_gguf", "gguf_tensor_types", "write_modelfile"]

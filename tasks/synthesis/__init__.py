"""What the synthesize stage needs inside: prompts from recipes (`recipes`), the backends that write stories
(`backend` for the interface, `llamacpp` and `ollama` one module each), token sampling for the embedded backend
(`sampling`), the quality gates (`quality`) and the append-only journal the stories go to (`journal`)."""

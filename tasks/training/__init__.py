"""The training engine behind the train stage: the loop (`loop`), checkpoints that resume exactly (`checkpoints`),
device and dtype choice (`devices`), data-parallel launch under torchrun (`distributed`) and energy tracking
(`emissions`)."""


def device_unavailable(name: str) -> str | None:
    """Why `train.device: name` cannot run on this machine (one line naming the fix), or None when it can. Checked
    before any stage runs; torch is imported only for a device that was asked for (a cached run does not load it)."""
    if name in ("auto", "cpu"):
        return None
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        return "train.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'"
    if name == "mps" and not torch.backends.mps.is_available():
        return "train.device is 'mps' but MPS is not available; use 'auto' or 'cpu'"
    return None

"""The training engine behind the train stage: the loop (`loop`), checkpoints that resume exactly (`checkpoints`),
device and dtype choice (`devices`), data-parallel launch under torchrun (`distributed`) and energy tracking
(`emissions`)."""

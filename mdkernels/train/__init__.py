"""The reference training loop: backbones, data (image folders, insightface RecordIO, generated
identities), verification evaluation, teacher -> student distillation, the ``mdk`` commands."""

"""Training and evaluation images: insightface's RecordIO, image folders, generated identities, augmentation."""

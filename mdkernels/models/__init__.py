"""Face-recognition backbones (insightface's IResNet and MobileFaceNet, key for key) and the mdk checkpoint that
holds one."""

"""Layer 5 (below it: core .. decode): model architectures (trainer and encoder), pretrained
backbones from torchvision / timm / open_clip, and the encoder file.
"""

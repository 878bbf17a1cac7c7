//! Frozen image backbones (ResNet-50 as in the official V1 code, EfficientNet-Lite0) and the
//! readers for every weight format users have: torchvision/official `.pth` (zip and legacy pickle)
//! and our own safetensors.

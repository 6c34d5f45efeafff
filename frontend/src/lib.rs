//! kiln-frontend: ONNX import (protobuf to IR) and tensor files (.pb, .npy).

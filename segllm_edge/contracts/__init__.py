"""The ground floor: on-disk and wire contracts (manifest, model info, precisions, export folder, engines,
onnxruntime setup, serving tensors, demo assets, backend names). numpy only; see docs/architecture.md."""

"""Deployable artefacts: CSR-packed safetensors (`csr`), ONNX (`onnx`) and a reference sparse runtime.

Kept import-light on purpose: `runtime` must load without the training code, and importing this
package runs this file first.
"""

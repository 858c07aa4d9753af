"""``leukoscope export --model M --onnx [--out FILE]``: ONNX for fast inference, checked against PyTorch."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export a model to ONNX (used automatically by predict and serve)")
    p.add_argument("--model", default=None, help="shipped model name or model directory")
    p.add_argument("--onnx", action="store_true", required=True, help="export to ONNX")
    p.add_argument("--out", help="ONNX file (default: model.onnx in the model directory)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from leukoscope.models import load_model
    from leukoscope.models.export import export_onnx, max_abs_diff

    model = load_model(args.model, backend="torch")
    out = export_onnx(model.module, model.input_size, args.out or model.path / "model.onnx")
    x = np.random.default_rng(0).normal(size=(4, 3, model.input_size, model.input_size)).astype(np.float32)
    diff = max_abs_diff(model.module, out, x)
    print(f"wrote {out}; largest logit difference to PyTorch on 4 random inputs: {diff:.2e}")
    return 0

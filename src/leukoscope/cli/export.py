"""``leukoscope export --model M (--onnx | --int8) [--out FILE]``: ONNX for fast inference, checked against PyTorch;
``--int8`` also quantises it (calibrated on the model's training images, checked on its held-out ones)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export a model to ONNX (used automatically by predict and serve) or int8 ONNX")
    p.add_argument("--model", default=None, help="shipped model name or model directory")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--onnx", action="store_true", help="export to ONNX (float32)")
    kind.add_argument("--int8", action="store_true",
                      help="int8 ONNX (model.int8.onnx, used with --backend int8) calibrated on training images")
    p.add_argument("--calibration", nargs="+", metavar="PATH",
                   help="--int8: calibration images (files, folders, globs; default: the model's training split)")
    p.add_argument("--n-calibration", type=int, default=256, help="--int8: training images to calibrate on")
    p.add_argument("--out", help="ONNX file (default: model.onnx / model.int8.onnx in the model directory)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from leukoscope.models import load_model
    from leukoscope.models.export import export_onnx, max_abs_diff

    model = load_model(args.model, backend="torch")
    if args.int8:
        from leukoscope.predict import collect_paths
        from leukoscope.quantize import export_int8

        cal = None
        if args.calibration:
            cal, problems = collect_paths(args.calibration)
            if problems or not cal:
                raise ValueError(f"calibration images not found: {problems or args.calibration}")
        out, rep = export_int8(model, n_calibration=args.n_calibration, calibration=cal, out=args.out)
        temp = f", temperature {rep['temperature']:.3f}" if rep.get("temperature") else ""
        print(f"wrote {out} (calibrated on {rep['calibration_images']} images{temp}); against float32 on "
              f"{rep['n_images']} {rep['checked_on']}: labels agree {rep['label_agreement']:.4f}, "
              f"probabilities differ by {rep['mean_abs_prob_diff']:.4f} on average, {rep['max_abs_prob_diff']:.4f} "
              "at most; for scale, float32 on the same images plus noise of one grey level: labels agree "
              f"{rep['float32_under_1_grey_level_noise']['label_agreement']:.4f}, probabilities differ by "
              f"{rep['float32_under_1_grey_level_noise']['mean_abs_prob_diff']:.4f} on average")
        return 0
    out = export_onnx(model.module, model.input_size, args.out or model.path / "model.onnx")
    x = np.random.default_rng(0).normal(size=(4, 3, model.input_size, model.input_size)).astype(np.float32)
    diff = max_abs_diff(model.module, out, x)
    print(f"wrote {out}; largest logit difference to PyTorch on 4 random inputs: {diff:.2e}")
    return 0

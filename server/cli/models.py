"""`tinymlaas models`: uploaded models."""

from __future__ import annotations

from tinymlaas.frontend.keras import QUANTIZE

from .common import api_client, api_options, output


def cmd_models_upload(args) -> int:
    m = api_client(args).upload_model(args.file, args.quantize, args.calibration)
    output(m, args.json, lambda m: f"model {m['id']}: {m['name']} ({m['size']:,} B, "
           f"{'int8' if m['quantized'] else 'float'}, sha256 {m['sha256'][:12]})"
           + "".join(f"\n  {n}" for n in m.get("notes") or []))
    return 0


def cmd_models_validation(args) -> int:
    m = api_client(args).upload_validation(args.model_id, args.file)
    output(m, args.json, lambda m: f"model {m['id']}: validation set of {m['validation_samples']:,} samples; every "
           "microcontroller build reports its accuracy on them")
    return 0


def register(sub) -> None:
    models = sub.add_parser("models", help="uploaded models").add_subparsers(dest="what", required=True)
    p = api_options(models.add_parser("upload", help="upload a model (.tflite, .keras/.h5 or .onnx)"))
    p.add_argument("file")
    p.add_argument("--quantize", choices=QUANTIZE, default="none",
                   help="a Keras model: quantize it while converting (default: none)")
    p.add_argument("--calibration", metavar="NPZ",
                   help="a Keras model quantized here: its calibration samples (one array per input, named after it)")
    p.set_defaults(func=cmd_models_upload)
    p = api_options(models.add_parser("validation", help="upload a model's held-out samples (.npz of x and y): its "
                                      "builds' accuracy, and what weights auto is judged on"))
    p.add_argument("model_id", type=int)
    p.add_argument("file")
    p.set_defaults(func=cmd_models_validation)

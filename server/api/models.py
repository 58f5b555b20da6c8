from flask import request

from .. import db
from ..services.common import of_org
from ..services.models import add_model, set_validation
from . import ctx, get_or_404, require, schemas, session
from .blueprint import Blueprint

blp = Blueprint("models", __name__, description="Uploaded models")


@blp.route("/models", methods=["POST"])
@blp.arguments(schemas.ModelUpload, location="files")
@blp.response(201, schemas.Model)
def upload(files):
    """Upload a model (multipart field `file`: TFLite, ONNX, or Keras converted here with the optional multipart
    fields `quantize`: none, int8, int16x8 or mixed, and `calibration`: an .npz of samples); parsed and checked
    before it is kept."""
    who = require("build")
    f, samples = files["file"], files.get("calibration")
    return add_model(session(), ctx().store, who, f.filename, f.read(), request.form.get("quantize", "none"),
                     samples.read() if samples is not None else None)


@blp.route("/models", methods=["GET"])
@blp.response(200, schemas.Model(many=True))
def list_models():
    who = require()
    return session().scalars(of_org(who, db.Model)).all()


@blp.route("/models/<int:model_id>", methods=["GET"])
@blp.response(200, schemas.Model)
def get_model(model_id):
    return get_or_404(db.Model, model_id, "model", require())


@blp.route("/models/<int:model_id>/validation", methods=["PUT"])
@blp.arguments(schemas.ValidationUpload, location="files")
@blp.response(200, schemas.Model)
def put_validation(files, model_id):
    """Upload the model's validation set (multipart field `file`: an .npz of `x` and `y`), checked against the
    model's input; every microcontroller build of it then reports its accuracy on them (the interpreter on the
    model the firmware computes), and `weights: auto` / `max_accuracy_drop` are judged on them."""
    who = require("build")
    model = get_or_404(db.Model, model_id, "model", who)
    return set_validation(session(), ctx().store, who, model, files["file"].read())

from flask import request
from flask_smorest import Blueprint
from sqlalchemy import select

from .. import db
from ..service import add_model
from . import ctx, get_or_404, require_user, schemas, session

blp = Blueprint("models", __name__, description="Uploaded models")


@blp.route("/models", methods=["POST"])
@blp.arguments(schemas.ModelUpload, location="files")
@blp.response(201, schemas.Model)
def upload(files):
    """Upload a model (multipart field `file`: TFLite, or Keras converted here with the optional multipart field
    `quantize`: none, int8, int16x8 or mixed); parsed and checked before it is kept."""
    user = require_user()
    f = files["file"]
    return add_model(session(), ctx().store, user, f.filename, f.read(), request.form.get("quantize", "none"))


@blp.route("/models", methods=["GET"])
@blp.response(200, schemas.Model(many=True))
def list_models():
    require_user()
    return session().scalars(select(db.Model).order_by(db.Model.id)).all()


@blp.route("/models/<int:model_id>", methods=["GET"])
@blp.response(200, schemas.Model)
def get_model(model_id):
    require_user()
    return get_or_404(db.Model, model_id, "model")

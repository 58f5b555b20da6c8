"""The blueprints' base: flask-smorest's, with a request parser that answers every unreadable body with a 400."""

from __future__ import annotations

import json
import sys

import flask_smorest
from flask import abort
from webargs.flaskparser import FlaskParser


class BodyParser(FlaskParser):
    """webargs' parser, every unreadable JSON body a 400: Python refuses an integer literal of more digits than
    sys.get_int_max_str_digits() with a ValueError that is not a JSONDecodeError, which webargs lets through."""

    def _raw_load_json(self, req):
        try:
            return super()._raw_load_json(req)
        except json.JSONDecodeError:
            raise  # webargs' own 400
        except ValueError:
            abort(400, f"the JSON body holds a number of more than {sys.get_int_max_str_digits():,} digits")


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = BodyParser()

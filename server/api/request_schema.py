"""The build request's schema, made from its one declaration (tinymlaas.build.request): each option the service
offers becomes a marshmallow field with its help, choices and range, nested in the object its `group` names."""

from marshmallow import Schema, fields, validate

from tinymlaas.build.request import groups, value_type

FIELD_TYPES = {bool: fields.Boolean, int: fields.Integer, float: fields.Float, str: fields.String}

# how each nested object is described, and whether it may be left out (None) or defaults to empty
GROUPS = {
    "constraints": ("budgets tighter than the board's", dict),
    "search": (("search kernel, schedule and fusion variants first; the best within the constraints is what gets "
                "built, signed and deployed"), None),
    "host": ("host targets (cpu-host, cuda-host): precision and tuning budget", None),
}
REQUIRED_IN_GROUP = {"budget"}  # a search is asked for by its budget


def _field(f, opt) -> fields.Field:
    checks = []
    allowed = opt.allowed()
    if allowed is not None:
        checks.append(validate.OneOf(allowed))
    if opt.min is not None or opt.max is not None:
        checks.append(validate.Range(min=opt.min, max=opt.max, min_inclusive=opt.min_inclusive))
    kind = value_type(f)
    extra = {"strict": True} if kind is int else {}
    if f.name in REQUIRED_IN_GROUP:
        return FIELD_TYPES[kind](required=True, validate=checks, metadata={"description": opt.help}, **extra)
    return FIELD_TYPES[kind](load_default=f.default, allow_none=f.default is None, validate=checks,
                             metadata={"description": opt.help}, **extra)


def request_fields() -> dict[str, fields.Field]:
    """The fields to add to the build request schema: top-level options and one nested object per group."""
    out = {}
    for group, members in groups("service").items():
        own = {f.name: _field(f, opt) for f, opt in members}
        if group is None:
            out.update(own)
            continue
        description, default = GROUPS[group]
        nested = Schema.from_dict(own, name=f"Build{group.title()}Options")
        out[group] = fields.Nested(nested, load_default=default, allow_none=default is None,
                                   metadata={"description": description})
    return out

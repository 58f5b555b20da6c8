"""Rows the API tests need in place without running the compiler."""

import io

from tests.helpers.paths import model_path


def done_build(app, client, headers: dict, group: str, devices: int = 1) -> tuple[int, dict]:
    """Devices `<group>-dev`, `<group>-dev2`, ... in `group`, an uploaded model, and a finished build of it with an
    image, the build written straight to the database (for tests of rollouts and access, not of the compiler):
    (build id, model)."""
    from server.db import Build, Model

    for i in range(1, devices + 1):
        r = client.post("/api/v1/devices", json={"id": f"{group}-dev{i if i > 1 else ''}", "target": "cortex-m4",
                                                 "group": group}, headers=headers)
        assert r.status_code == 201, r.get_json()
    m = client.post("/api/v1/models", data={"file": (io.BytesIO(model_path("ad01_int8").read_bytes()), "ad.tflite")},
                    headers=headers).get_json()
    with app.extensions["tinymlaas"].sessions() as s:
        row = s.get(Model, m["id"])
        b = Build(model_id=row.id, target="cortex-m4", version="1.0.7+0", state="done",
                  artifacts={"image": "0" * 64, "selftest": "1" * 64}, owner_id=row.owner_id, org_id=row.org_id)
        s.add(b)
        s.commit()
        return b.id, m

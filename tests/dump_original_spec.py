"""Write the original CyborgDB service's OpenAPI document to the path given.

Run with the Python of a venv that has `cyborgdb-service` installed (tests/run.sh does this).
The FastAPI app is imported, not started: no port, no data directory, no network.
"""
import json
import os
import sys
import tempfile


def main(out):
    out = os.path.abspath(out)
    # The app's settings read the environment at import: keep it away from ours.
    for k in list(os.environ):
        if k.startswith("CYBORGDB_"):
            del os.environ[k]
    os.chdir(tempfile.mkdtemp())
    from cyborgdb_service.app import app

    spec = app.openapi()
    if not spec.get("paths"):
        sys.exit("the original service's app has no paths")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(spec, f, indent=1, sort_keys=True)
    os.replace(tmp, out)
    print(f"original spec {spec['info']['version']}: {len(spec['paths'])} paths -> {out}")


if __name__ == "__main__":
    main(sys.argv[1])

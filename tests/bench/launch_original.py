"""Start the original cyborgdb-service bound to 127.0.0.1 (its main() binds 0.0.0.0)."""
import uvicorn

_run = uvicorn.run


def _loopback_run(*args, **kwargs):
    kwargs["host"] = "127.0.0.1"
    return _run(*args, **kwargs)


uvicorn.run = _loopback_run

from cyborgdb_service.main import main  # noqa: E402

main()

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from moon.cli import cli
from moon.models import Family, register_family, unregister_family
from moon.serve.server import MoonH11Protocol


@pytest.fixture
def toy_family(served_index):
    _, _, embedder = served_index
    register_family(Family("toy", lambda arg: type(embedder)(arg or "")))
    yield
    unregister_family("toy")


def test_serve_passes_host_port_and_limits_to_uvicorn(served_index, toy_family, monkeypatch):
    import uvicorn

    index_dir, _, _ = served_index
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    result = CliRunner().invoke(
        cli,
        [
            "serve",
            str(index_dir),
            "--model",
            "toy",
            "--port",
            "9123",
            "--max-k",
            "5",
            "--max-text",
            "8",
            "--read-timeout",
            "7.5",
            "--max-connections",
            "9",
            "--allow-truncation",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    ((app, kw),) = calls
    assert kw["host"] == "127.0.0.1" and kw["port"] == 9123
    # the server protocol (read deadline, connection limit, strict framing) gets the limits
    assert issubclass(kw["http"], MoonH11Protocol)
    assert (kw["http"].limits.read_timeout_s, kw["http"].limits.max_connections) == (7.5, 9)
    assert kw["http"].limits.allow_truncation  # --allow-truncation reaches /v1/embeddings' limits
    with TestClient(app) as client:
        assert client.post("/search", json={"text": "red shoe", "k": 5}).json()["results"][0]["id"] == "red-shoe"
        assert "between 1 and 5" in client.post("/search", json={"text": "hat", "k": 6}).json()["error"]["message"]
        assert "limit is 8" in client.post("/search", json={"text": "a long red shoe"}).json()["error"]["message"]

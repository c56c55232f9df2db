import pytest

from tests.support.server import KvrouterServer


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """Factory: start_server(*args) -> a running KvrouterServer, stopped when the module
    that started it ends (each live server holds about 1 GB)."""
    started: list[KvrouterServer] = []

    def start(*args: str, name: str = "server") -> KvrouterServer:
        log = tmp_path_factory.mktemp("logs") / f"{name}.log"
        server = KvrouterServer(list(args), log).start()
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def agent_clients():
    """The pinned Claude Code and Codex CLI from npm, installed once into a cached prefix
    (tests/support/agent_clients.py); skipped only where npm itself is missing."""
    from tests.support import agent_clients as ac

    try:
        return ac.install()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: tiny_model(family) -> the directory of a small random-weight mlx-lm
    model of that family (tests/support/tiny_models.py), built once per session."""
    from tests.support.tiny_models import build_model_dir, tokenizer_dir

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict = {}

    def get(family: str):
        if family not in built:
            built[family] = build_model_dir(family, root / family, tokenizer_dir(root / "tokenizer"))
        return built[family]

    return get

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

import pytest

from tests.support.server import KvrouterServer


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """Factory: start_server(*args) -> a running KvrouterServer, stopped at session end."""
    started: list[KvrouterServer] = []

    def start(*args: str, name: str = "server") -> KvrouterServer:
        log = tmp_path_factory.mktemp("logs") / f"{name}.log"
        server = KvrouterServer(list(args), log).start()
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()

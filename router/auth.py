"""API keys and the cache namespace of a request.

`--api-keys-file`: one key per line, an optional name after whitespace, `#`
starts a comment. With keys configured every request needs one (OpenAI
clients send `Authorization: Bearer KEY`, Anthropic clients `x-api-key: KEY`,
gRPC clients either as call metadata); without keys there is no auth.

A request's namespace (part of every checkpoint key, see cachestore.keys) is a
type-tagged encoding of (key name, client namespace), where the client
namespace comes from the `x-kvrouter-namespace` header. The key name is fixed
by the server, and the client part is a JSON string inside a JSON array, so no
header value can spell another key's namespace (store case C9). With no key
and no header the namespace is "" (the default, shared namespace).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from kvrouter.router.errors import BadRequest, Unauthorized

NAMESPACE_HEADER = "x-kvrouter-namespace"
MAX_NAMESPACE_CHARS = 128


@dataclass(frozen=True)
class ApiKeys:
    """Configured keys: (key, name) pairs. A key without a name is named by a
    short hash of itself (the key itself never becomes part of a namespace)."""

    entries: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, text: str, source: str = "api keys") -> "ApiKeys":
        """Parses the file format; raises ValueError naming the line of a problem."""
        entries: list[tuple[str, str]] = []
        seen: set[str] = set()
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split(None, 1)
            key = parts[0]
            name = parts[1].strip() if len(parts) > 1 else "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]
            if key in seen:
                raise ValueError(f"{source}:{lineno}: duplicate key")
            seen.add(key)
            entries.append((key, name))
        if not entries:
            raise ValueError(f"{source}: no keys (one key per line, optional name after whitespace)")
        return cls(tuple(entries))

    @classmethod
    def load(cls, path: Path) -> "ApiKeys":
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ValueError(f"--api-keys-file {path}: {exc.strerror}") from exc
        return cls.parse(text, str(path))

    def name_of(self, key: str | None) -> str | None:
        """The name of a valid key, else None (constant-time comparison per key)."""
        if not key:
            return None
        found = None
        for k, name in self.entries:
            if hmac.compare_digest(k.encode(), key.encode("utf-8", "surrogatepass")):
                found = name
        return found


def key_from_headers(headers: Mapping[str, str]) -> str | None:
    """The API key a client sent: `x-api-key`, else `Authorization: Bearer KEY`."""
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    auth = headers.get("authorization") or headers.get("Authorization") or ""
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def make_namespace(key_name: str | None, client_namespace: str | None) -> str:
    """The store namespace for (key name, client namespace); "" when both are absent."""
    if key_name is None and not client_namespace:
        return ""
    return "kvr1:" + json.dumps([key_name, client_namespace or ""], ensure_ascii=True, separators=(",", ":"))


def check_client_namespace(value: str | None) -> str | None:
    """Validates the `x-kvrouter-namespace` value; raises BadRequest."""
    if value is None or value == "":
        return None
    if len(value) > MAX_NAMESPACE_CHARS or not value.isprintable():
        raise BadRequest(f"{NAMESPACE_HEADER} must be at most {MAX_NAMESPACE_CHARS} printable characters",
                         param=NAMESPACE_HEADER)
    return value


def identify(keys: ApiKeys | None, headers: Mapping[str, str]) -> tuple[str, str | None]:
    """(namespace, key name) of a request with these headers (HTTP headers or gRPC
    metadata, lower-case names); the key name is None without keys. Raises
    Unauthorized when keys are configured and no valid key was sent, BadRequest for a
    bad namespace header."""
    client_ns = check_client_namespace(headers.get(NAMESPACE_HEADER))
    if keys is None:
        return make_namespace(None, client_ns), None
    name = keys.name_of(key_from_headers(headers))
    if name is None:
        raise Unauthorized("invalid or missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                           code="invalid_api_key")
    return make_namespace(name, client_ns), name


def authorize(keys: ApiKeys | None, headers: Mapping[str, str]) -> str:
    """The namespace of a request with these headers (see `identify`)."""
    return identify(keys, headers)[0]


def namespace_owner(namespace: str) -> str | None:
    """The key name a namespace belongs to (see `make_namespace`), or None for the
    default namespace and namespaces made without a key."""
    if not namespace.startswith("kvr1:"):
        return None
    try:
        owner, _ = json.loads(namespace[len("kvr1:"):])
    except (ValueError, TypeError):
        return None
    return owner if isinstance(owner, str) else None


def check_admin_keys(keys: ApiKeys | None, names: tuple[str, ...]) -> frozenset[str]:
    """The `--admin-keys` names, checked against the keys file. Raises ValueError when
    given without keys or naming a key the file does not have."""
    if not names:
        return frozenset()
    if keys is None:
        raise ValueError("--admin-keys needs --api-keys-file (admin keys are named there)")
    known = {name for _, name in keys.entries}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"--admin-keys: no key named {', '.join(unknown)} in the keys file")
    return frozenset(names)

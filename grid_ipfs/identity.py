"""Ed25519 identities: who sent a pubsub message, who trained an update, who signed a chain block.

Pubsub's own `from` is the daemon's peer ID, shared by every process on that daemon, so it says nothing
about which worker or client spoke. Each process therefore holds its own Ed25519 key and signs what it
publishes. The public half, written as unpadded base64url of its 32 raw bytes (43 characters), *is* the
worker/client id everywhere in the protocol and the chain: ids are short, safe in JSON and file names,
and verifying a signature needs nothing but the id itself.

Ids are compared as strings, so only the canonical spelling is accepted (`parse_public_id`): base64 has
several spellings of the same bytes (padding, non-zero trailing bits), and one key must have one id.
"""

from __future__ import annotations

import base64
import os
import re
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import GridError

__all__ = [
    "Identity", "IdentityError", "verify", "default_key_path", "read_id_list",
    "parse_public_id", "is_public_id", "id_options_joined", "b64url_encode", "b64url_decode",
]

PUBLIC_ID_LENGTH = 43
"""Length of an id: 32 bytes in unpadded base64url."""

SIGNATURE_LENGTH = 64

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class IdentityError(GridError):
    """A key file that cannot be used as is (too open, unreadable, not an Ed25519 key), or a bad id."""


def b64url_encode(raw: bytes) -> str:
    """Unpadded base64url: the text form of ids and pubsub signatures."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict inverse of `b64url_encode`: rejects padding, other alphabets and non-canonical spellings.

    Raises ValueError. Strictness matters because ids and signatures are compared and hashed as text.
    """
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(raw) != text:
        raise ValueError("not canonical base64url (non-zero trailing bits)")
    return raw


def parse_public_id(public_id: str) -> bytes:
    """The 32 raw public-key bytes of a canonical id; IdentityError otherwise."""
    try:
        if not isinstance(public_id, str) or len(public_id) != PUBLIC_ID_LENGTH:
            raise ValueError(f"expected {PUBLIC_ID_LENGTH} characters")
        return b64url_decode(public_id)
    except ValueError as exc:
        shown = repr(public_id) if len(repr(public_id)) <= 60 else repr(public_id)[:57] + "..."
        raise IdentityError(f"not a public id: {shown} ({exc})") from None


def id_options_joined(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """`argv` with each `OPTION ID` pair of `options` written `OPTION=ID`: one id in 64 begins with "-"
    (base64url), which argparse would take for an option of its own ("expected one argument")."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in options and i + 1 < len(argv) and argv[i + 1].startswith("-") and is_public_id(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def is_public_id(value: object) -> bool:
    """True for a canonical id string (it may still not be a valid curve point; `verify` checks that)."""
    try:
        parse_public_id(value)  # type: ignore[arg-type]
    except IdentityError:
        return False
    return True


def verify(public_id: str, data: bytes, sig: bytes) -> bool:
    """Check an Ed25519 signature by the key named `public_id`. False on any malformed input, never raises.

    Callers handle untrusted values here, so "invalid" and "malformed" are the same answer.
    """
    try:
        key = Ed25519PublicKey.from_public_bytes(parse_public_id(public_id))
        if not isinstance(sig, (bytes, bytearray)) or len(sig) != SIGNATURE_LENGTH:
            return False
        key.verify(bytes(sig), bytes(data))
        return True
    except (IdentityError, InvalidSignature, ValueError, TypeError):
        return False


def default_key_path(role: str) -> Path:
    """Where a role's key lives by default: `$GRID_IPFS_HOME/<role>.key`, else `~/.grid_ipfs/<role>.key`."""
    home = os.environ.get("GRID_IPFS_HOME")
    return (Path(home) if home else Path.home() / ".grid_ipfs") / f"{role}.key"


def read_id_list(path: str | os.PathLike) -> set[str]:
    """The ids in an allow-list file: one per line, `#` starts a comment, blank lines ignored.

    Every entry must be a canonical id; a typo raises IdentityError naming file and line, because a
    silently ignored entry would lock out (or let in) the wrong party.
    """
    ids = set()
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not is_public_id(entry):
            raise IdentityError(f"{path}:{number}: not a public id: {entry[:60]!r}")
        ids.add(entry)
    return ids


class Identity:
    """An Ed25519 key pair; `id` is the public key as the protocol spells it."""

    def __init__(self, private_key: Ed25519PrivateKey, path: Path | None = None):
        self._key = private_key
        self.path = path
        """The key file it was loaded from, or None for an in-memory identity."""
        self._id = b64url_encode(private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    @property
    def id(self) -> str:
        """Unpadded base64url of the 32 raw public-key bytes: the worker/client id."""
        return self._id

    def __repr__(self) -> str:
        return f"Identity({self.id})"

    @classmethod
    def generate(cls) -> Identity:
        """A fresh key that lives in memory only (tests, throwaway workers)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> Identity:
        """Load the key at `path`, creating it (mode 0600, parent directories too) on first use.

        A file lock makes two processes starting together end up with the same single key, and the file
        is created with O_EXCL so an existing key is never overwritten. A key readable or writable by
        group or others is refused rather than silently used (or silently chmod'ed): someone else may
        already have copied it, and the owner should know.
        """
        from filelock import FileLock

        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with FileLock(f"{path}.lock"):
            if path.exists():
                return cls._load(path)
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            return cls(key, path)

    @classmethod
    def _load(cls, path: Path) -> Identity:
        mode = stat.S_IMODE(path.stat().st_mode)
        if os.name == "posix" and mode & 0o077:
            raise IdentityError(f"key file {path} has mode {mode:04o}, open to group/others; "
                                f"fix it with `chmod 600 {path}` (or delete it to make a new identity)")
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise IdentityError(f"key file {path} is not a readable PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"key file {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key, path)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `data`."""
        return self._key.sign(bytes(data))


# -- command line ------------------------------------------------------------------------------------------

_ROLE = re.compile(r"client|worker-[^/\\\x00]+")


def _key_path(args, parser) -> Path:
    if (args.keyfile is None) == (args.role is None):
        parser.error("give a KEYFILE or --role ROLE (one of them)")
    if args.role is not None:
        if not _ROLE.fullmatch(args.role):
            parser.error(f"--role must be `client` or `worker-NAME` (NAME without slashes), got {args.role!r}")
        return default_key_path(args.role)
    return Path(args.keyfile).expanduser()


def main(argv: list[str] | None = None) -> int:
    """`python -m grid_ipfs.identity show|new`: print a key file's public id, or create a key file."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m grid_ipfs.identity",
        description="Print the public id of an Ed25519 key file, or create one. The id is what "
                    "--allow-workers and --trust-clients files list, one per line.",
        epilog="Roles name the default key files: --role client is ~/.grid_ipfs/client.key, --role worker-NAME "
               "is ~/.grid_ipfs/worker-NAME.key ($GRID_IPFS_HOME instead of ~/.grid_ipfs when set). "
               "Exit codes: 0 ok, 1 error (one `error:` line), 2 usage.")
    sub = parser.add_subparsers(dest="command", required=True)
    parsers = {}
    for name, text in (("show", "print the id of an existing key file (creates nothing)"),
                       ("new", "create a key file (mode 0600) and print its id; refuses to overwrite")):
        p = parsers[name] = sub.add_parser(name, help=text, description=text)
        p.add_argument("keyfile", nargs="?", metavar="KEYFILE", help="the key file")
        p.add_argument("--role", metavar="ROLE", help="the default key file of `client` or `worker-NAME`")
    args = parser.parse_args(argv)
    path = _key_path(args, parsers[args.command])
    try:
        if args.command == "show":
            if not path.exists():
                raise IdentityError(f"no key file at {path} (create one with "
                                    f"`python -m grid_ipfs.identity new {path}`)")
            if not path.is_file():
                raise IdentityError(f"{path} is not a file")
            identity = Identity._load(path)
        else:
            if path.exists():
                raise IdentityError(f"{path} already exists; refusing to overwrite a key (its id: "
                                    f"`python -m grid_ipfs.identity show {path}`)")
            identity = Identity.load_or_create(path)
    except (IdentityError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(identity.id)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
